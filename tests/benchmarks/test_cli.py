"""The `python -m benchmarks` command line, the registry and the run context."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from matplotlib.figure import Figure

from benchmarks.__main__ import main
from benchmarks.registry import (
    EXPERIMENT_MODULES,
    REGISTRY,
    ExperimentConfig,
    Registry,
    config_fields,
    make_config,
    param,
    parse_value,
)
from benchmarks.runner import derive_rng
from benchmarks.stats import online_summary

REPO = Path(__file__).resolve().parents[2]
VOLATILE = {"started_at", "wall_time_s", "timings_s", "versions", "git", "machine", "argv"}

# A tiny experiment, registered only inside these tests (never in the shipped registry).
DUMMY_MODULE = textwrap.dedent(
    '''
    """Dummy experiment for the CLI tests."""

    from dataclasses import dataclass, replace

    import numpy as np
    from matplotlib.figure import Figure

    from benchmarks.registry import ExperimentConfig, experiment, param
    from benchmarks.stats import one_sample_effect, online_summary


    @dataclass(frozen=True)
    class DummyConfig(ExperimentConfig):
        """Config of the dummy experiment."""

        n_users: int = param(1000, "users per seed")
        scale: float = param(1.0, "mean reward per user")

        @classmethod
        def quick(cls):
            return replace(cls(), n_users=300)


    @experiment("dummy", "Draws seeded rewards and reports them.", DummyConfig)
    def run(cfg, ctx):
        rows, per_seed = [], []
        for seed in ctx.progress(ctx.seeds, desc="seeds"):
            with ctx.timer("draw") as t:
                r = ctx.rng(seed, "rewards").normal(cfg.scale, 1.0, size=cfg.n_users)
            per_seed.append(r)
            rows.append({"world": "tiny", "policy": "random", "model": "none", "seed": seed,
                         "reward": float(r.mean()), "wall_s": t.seconds})
        ctx.report.seed_table("Reward", rows, ["reward"], fmt={"reward": ".5f"})
        online = online_summary(per_seed)
        eff = one_sample_effect(np.concatenate(per_seed), 0.0, unit="users")
        ctx.report.finding("reward is positive", eff, metric="reward per user")
        fig = Figure(figsize=(3, 2))
        fig.add_subplot().hist(np.concatenate(per_seed), bins=20)
        ctx.report.figure("hist", fig, "Rewards", data={"reward_mean": online.mean})
        ctx.report.add_result("online", online)
        ctx.report.headline(f"reward {online.format('.4f')}")
    '''
)


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "dummy_bench.py").write_text(DUMMY_MODULE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def mask(doc: dict) -> dict:
    """Drop run-to-run volatile values (times, versions, paths) and keep everything else."""
    out = {k: v for k, v in doc.items() if k not in VOLATILE}
    for table in out.get("tables", []):
        for row in table["rows"]:
            row.pop("wall_s", None)
    return out


# ------------------------------------------------------------------------- subprocess


def test_unknown_name_exits_2_with_clear_error(tmp_path):
    proc = run_cli(["no_such_experiment", "--out", str(tmp_path / "r")], tmp_path)
    assert proc.returncode == 2
    assert "unknown experiment 'no_such_experiment'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_list_describes_experiments_and_config_fields(tmp_path):
    proc = run_cli(["list", "--module", "dummy_bench"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dummy" in out and "Draws seeded rewards and reports them." in out
    assert "--set n_users=  [int] 1000 (quick: 300)" in out
    assert "users per seed" in out and "mean reward per user" in out


def test_dummy_runs_end_to_end_and_is_reproducible(tmp_path):
    outs = []
    for sub in ("a", "b"):
        out = tmp_path / sub
        proc = run_cli(
            ["dummy", "--module", "dummy_bench", "--quick", "--quiet", "--out", str(out)],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # --quiet: no progress bars, no progress lines
        assert proc.stdout.strip() == f"Reports index: {out / 'index.md'}"
        for name in ("dummy/report.md", "dummy/results.json", "dummy/hist.png", "index.md"):
            assert (out / name).is_file(), name
        outs.append(out)
    a, b = (json.loads((o / "dummy" / "results.json").read_text()) for o in outs)
    assert a["seeds"] == [0] and a["profile"] == "quick" and a["config"]["n_users"] == 300
    assert a["command"] == "python -m benchmarks dummy --quick --seeds 1 --module dummy_bench"
    assert a["argv"][1:] == ["dummy", "--module", "dummy_bench", "--quick", "--quiet", "--out",
                             str(outs[0])]  # fmt: skip
    assert mask(a) == mask(b)  # same command, same seeds: same numbers
    drawn = derive_rng(0, "rewards").normal(1.0, 1.0, 300)  # what seed 0 must have drawn
    assert a["results"]["online"]["mean"] == pytest.approx(drawn.mean(), rel=1e-12)
    assert (outs[0] / "dummy" / "hist.png").read_bytes() == (
        outs[1] / "dummy" / "hist.png"
    ).read_bytes()
    index = (outs[0] / "index.md").read_text()
    assert "[dummy](dummy/report.md)" in index and "1 HOLDS / 0 REFUTED" in index
    report = (outs[0] / "dummy" / "report.md").read_text()
    assert "![Rewards](hist.png)" in report and "- **HOLDS** — reward is positive" in report


# ------------------------------------------------------------------------- in process


@dataclass(frozen=True)
class TinyConfig(ExperimentConfig):
    """Config of the in-process test experiments."""

    n: int = param(40, "values drawn per seed")
    scale: float = param(1.0, "scale of the values")
    tag: str = param("t", "a label")

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"n must be >= 2, got {self.n}")

    @classmethod
    def quick(cls) -> TinyConfig:
        return replace(cls(), n=20)


def make_registry() -> Registry:
    reg = Registry()

    @reg.experiment("tiny", "Draws values from seeded generators.", TinyConfig)
    def run_tiny(cfg, ctx):
        rows = []
        for seed in ctx.progress(ctx.seeds, desc="seeds"):
            with ctx.timer("draw") as t:
                x = ctx.rng(seed, "x").random(cfg.n) * cfg.scale
            rows.append(
                {"world": "w", "policy": "p", "model": cfg.tag, "seed": seed, "x": x.mean()}
                | {"wall_s": t.seconds}
            )
        rows_out = ctx.report.seed_table("X", rows, ["x"])
        mean_x = rows_out[0]["x"].mean
        ctx.report.sanity("mean below scale", bool(mean_x < cfg.scale), f"{mean_x} < {cfg.scale}")
        ctx.report.add_result("per_seed", [r["x"] for r in rows])
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([r["x"] for r in rows])
        ctx.report.figure("x", fig, "x per seed")

    @reg.experiment("broken", "Raises on purpose after writing a section.", TinyConfig)
    def run_broken(cfg, ctx):
        ctx.report.section("Before", "written before the error")
        raise RuntimeError("boom on purpose")

    @reg.experiment("failing_sanity", "Its only sanity check fails.", TinyConfig)
    def run_failing(cfg, ctx):
        ctx.report.sanity("one exceeds two", bool(1.0 > 2.0), "1 vs 2")

    return reg


def results(out: Path, name: str) -> dict:
    return json.loads((out / name / "results.json").read_text())


def test_list_and_all_with_no_experiments(capsys):
    assert main(["list"], registry=Registry(), modules=[]) == 0
    assert "No experiments registered" in capsys.readouterr().out
    assert main(["all", "--quick"], registry=Registry(), modules=[]) == 0
    assert "nothing to run" in capsys.readouterr().out


def test_shipped_registry_lists_cleanly(capsys):
    code = main(["list"], modules=EXPERIMENT_MODULES)
    assert code == 0, capsys.readouterr().err
    # Contract for every shipped experiment: both profiles build and validate.
    for exp in REGISTRY:
        for quick in (False, True):
            cfg = make_config(exp.config_cls, quick=quick)
            assert isinstance(cfg, exp.config_cls), exp.name


def test_all_continues_past_a_failing_experiment(tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(
        ["all", "--quick", "--quiet", "--out", str(out)], registry=make_registry(), modules=[]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert "1 experiment(s) failed: broken" in captured.err
    assert captured.out.strip() == f"Reports index: {out / 'index.md'}"
    assert results(out, "tiny")["status"] == "ok"
    broken = results(out, "broken")
    assert broken["status"] == "error" and "RuntimeError: boom on purpose" in broken["error"]
    md = (out / "broken" / "report.md").read_text()
    assert "## Error" in md and "boom on purpose" in md and "written before the error" in md
    assert results(out, "failing_sanity")["sanity"][0]["passed"] is False
    rows = [ln for ln in (out / "index.md").read_text().splitlines() if ln.startswith("| [")]
    assert [r.split("]")[0] for r in rows] == ["| [tiny", "| [broken", "| [failing_sanity"]
    assert "| ERROR |" in rows[1] and "0 passed / 1 failed" in rows[2]


def test_strict_fails_on_a_failing_sanity_check(tmp_path, capsys):
    args = ["failing_sanity", "--quick", "--out", str(tmp_path)]
    assert main(args, registry=make_registry(), modules=[]) == 0
    err = capsys.readouterr().err
    assert "failing_sanity: ok in" in err and "sanity checks 0 passed / 1 failed" in err
    assert main([*args, "--quiet", "--strict"], registry=make_registry(), modules=[]) == 1


def test_seeds_profiles_and_determinism(tmp_path):
    reg = make_registry()
    assert main(["tiny", "--quiet", "--out", str(tmp_path / "a")], reg, []) == 0
    full = results(tmp_path / "a", "tiny")
    assert full["seeds"] == [0, 1, 2] and full["profile"] == "full" and full["config"]["n"] == 40
    assert main(["tiny", "--quiet", "--out", str(tmp_path / "b")], reg, []) == 0
    assert mask(full) == mask(results(tmp_path / "b", "tiny"))
    expected = [derive_rng(s, "x").random(40).mean() for s in range(3)]
    assert full["results"]["per_seed"] == pytest.approx(expected, rel=1e-15)

    assert main(["tiny", "--quick", "--quiet", "--out", str(tmp_path / "q")], reg, []) == 0
    quick = results(tmp_path / "q", "tiny")
    assert quick["seeds"] == [0] and quick["config"]["n"] == 20
    assert quick["results"]["per_seed"] != full["results"]["per_seed"][:1]  # n differs

    args = ["tiny", "--seeds", "2", "--first-seed", "5", "--quiet", "--out", str(tmp_path / "s")]
    assert main(args, reg, []) == 0
    shifted = results(tmp_path / "s", "tiny")
    assert shifted["seeds"] == [5, 6]
    assert shifted["command"].startswith("python -m benchmarks tiny --seeds 2 --first-seed 5")


def test_set_overrides_are_typed_and_validated(tmp_path, capsys):
    reg = make_registry()
    out = str(tmp_path)
    args = ["tiny", "--quick", "--quiet", "--out", out, "--set", "n=7", "--set", "tag=abc"]
    assert main(args, reg, []) == 0
    doc = results(tmp_path, "tiny")
    assert doc["config"] == {"n": 7, "scale": 1.0, "tag": "abc"}
    assert doc["overrides"] == {"n": "7", "tag": "abc"}
    assert "--set n=7 --set tag=abc" in doc["command"]
    capsys.readouterr()

    bad = {
        "n=abc": "n='abc' must be an int",
        "nope=1": "unknown config field(s) ['nope']",
        "n=1": "n must be >= 2, got 1",
        "n": "--set expects KEY=VALUE",
    }
    for item, message in bad.items():
        assert main(["tiny", "--quiet", "--out", out, "--set", item], reg, []) == 2, item
        assert message in capsys.readouterr().err

    all_args = ["all", "--quick", "--quiet", "--out", str(tmp_path / "all")]
    assert main([*all_args, "--set", "n=5"], reg, []) == 2
    assert "under `all`, --set needs NAME.KEY=VALUE" in capsys.readouterr().err
    assert main(["tiny", "--quiet", "--out", out, "--set", "broken.n=5"], reg, []) == 2
    assert "which is not run" in capsys.readouterr().err
    assert main([*all_args, "--set", "tiny.n=5"], reg, []) == 1  # `broken` raises
    assert results(tmp_path / "all", "tiny")["config"]["n"] == 5
    assert results(tmp_path / "all", "broken")["config"]["n"] == 20


def test_bad_options_exit_2(tmp_path):
    for args in (
        ["tiny", "--seeds", "0"],
        ["tiny", "--threads", "0"],
        ["tiny", "--first-seed", "-1"],
        ["tiny", "--device", "gpu"],
    ):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(tmp_path)], make_registry(), [])
        assert exc.value.code == 2


def test_device_is_recorded_and_reaches_the_context(tmp_path):
    # "auto" resolves where the work runs; the CLI records what was asked for
    assert main(["tiny", "--quick", "--quiet", "--device", "auto", "--out", str(tmp_path)],
                make_registry(), []) == 0  # fmt: skip
    doc = results(tmp_path, "tiny")
    assert doc["device"] == "auto" and "--device auto" in doc["command"]
    assert "| device | auto |" in (tmp_path / "tiny" / "report.md").read_text()
    main(["tiny", "--quick", "--quiet", "--out", str(tmp_path / "d")], make_registry(), [])
    assert results(tmp_path / "d", "tiny")["device"] == "cpu"


def test_all_leaves_out_the_excluded(tmp_path, capsys):
    argv = ["all", "--quick", "--quiet", "--out", str(tmp_path)]
    assert main([*argv, "--exclude", "broken, failing_sanity"], make_registry(), []) == 0
    assert (tmp_path / "tiny" / "results.json").exists()
    assert not (tmp_path / "broken").exists() and not (tmp_path / "failing_sanity").exists()
    assert main([*argv, "--exclude", "tiny,nope"], make_registry(), []) == 2
    assert "--exclude: unknown experiment(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["tiny", "--exclude", "broken", "--out", str(tmp_path)], make_registry(), [])
    assert err.value.code == 2
    assert "--exclude applies to `all` only" in capsys.readouterr().err


def test_unknown_name_in_process(tmp_path, capsys):
    assert main(["nope", "--out", str(tmp_path)], make_registry(), []) == 2
    assert (
        "unknown experiment 'nope'; registered: tiny, broken, failing_sanity"
        in capsys.readouterr().err
    )


def test_module_import_failure_is_reported(tmp_path, capsys):
    assert main(["list"], Registry(), ["benchmarks.no_such_module_xyz"]) == 1
    assert "could not import experiment module 'benchmarks.no_such_module_xyz'" in (
        capsys.readouterr().err
    )


def test_stale_figures_are_removed(tmp_path):
    reg = Registry()
    state = {"draw": True}

    @reg.experiment("fig", "Draws a figure only the first time.", TinyConfig)
    def run_fig(cfg, ctx):
        if state["draw"]:
            ctx.report.figure("old", Figure(figsize=(1, 1)), "old figure")

    assert main(["fig", "--quick", "--quiet", "--out", str(tmp_path)], reg, []) == 0
    assert (tmp_path / "fig" / "old.png").exists()
    state["draw"] = False
    assert main(["fig", "--quick", "--quiet", "--out", str(tmp_path)], reg, []) == 0
    assert not (tmp_path / "fig" / "old.png").exists()


def test_progress_and_timer_in_context(tmp_path, capsys):
    reg = Registry()

    @reg.experiment("ctx", "Uses the context's helpers.", TinyConfig)
    def run_ctx(cfg, ctx):
        assert list(ctx.progress(range(3), desc="loop")) == [0, 1, 2]
        for _ in range(2):
            with ctx.timer("block") as t:
                pass
        assert t.seconds >= 0.0 and ctx.timings["block"] >= t.seconds
        a = ctx.torch_generator(0, "init")
        b = ctx.torch_generator(0, "init")
        import torch

        assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
        ctx.log("hello")

    assert main(["ctx", "--quick", "--out", str(tmp_path)], reg, []) == 0
    err = capsys.readouterr().err
    assert "[ctx] hello" in err and "[1/1] ctx: ok" in err
    assert "block" in results(tmp_path, "ctx")["timings_s"]
    assert main(["ctx", "--quick", "--quiet", "--out", str(tmp_path)], reg, []) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------- registry, configs


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


@dataclass(frozen=True)
class TypedConfig(ExperimentConfig):
    """Every supported field type."""

    flag: bool = param(False, "a switch")
    k: int = param(10, "a count")
    lr: float = param(0.1, "a rate")
    name: str = param("x", "a name")
    dims: tuple[int, ...] = param((8, 16), "sizes")
    pair: tuple[int, float] = param((1, 0.5), "a pair")
    loss: Literal["bce", "softmax"] = param("bce", "a choice")
    cap: int | None = param(None, "optional cap")
    mode: Mode = param(Mode.FAST, "an enum")


def test_parse_value_follows_field_types():
    types = {f.name: f.type for f in config_fields(TypedConfig)}
    assert parse_value("yes", types["flag"]) is True and parse_value("0", types["flag"]) is False
    assert parse_value("1_000", types["k"]) == 1000
    assert parse_value("1e-3", types["lr"]) == 1e-3
    assert parse_value("32,64", types["dims"]) == (32, 64)
    assert parse_value("", types["dims"]) == ()
    assert parse_value("3, 2.5", types["pair"]) == (3, 2.5)
    assert parse_value("softmax", types["loss"]) == "softmax"
    assert parse_value("none", types["cap"]) is None and parse_value("5", types["cap"]) == 5
    assert parse_value("slow", types["mode"]) is Mode.SLOW
    for text, field_name, msg in [
        ("maybe", "flag", "must be a bool"),
        ("1.5", "k", "must be an int"),
        ("bpr", "loss", "must be one of ['bce', 'softmax']"),
        ("1", "pair", "needs 2 comma-separated values"),
        ("x", "cap", "matches none of"),
        ("medium", "mode", "must be one of ['FAST', 'SLOW']"),
    ]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            parse_value(text, types[field_name], field_name)
    cfg = make_config(TypedConfig, quick=False, overrides={"dims": "4", "mode": "SLOW"})
    assert cfg.dims == (4,) and cfg.mode is Mode.SLOW and cfg.k == 10


def test_registry_rejects_bad_registrations():
    reg = Registry()

    def run(cfg, ctx):
        pass

    class NotFrozen(ExperimentConfig):  # not decorated: not a frozen dataclass of its own
        """Mutable."""

        a: int = 1

    @dataclass(frozen=True)
    class NoHelp(ExperimentConfig):
        """A field without help."""

        a: int = 1

    @dataclass(frozen=True)
    class Plain:
        """Not an ExperimentConfig."""

    cases = [
        (("Bad-Name", "d", TinyConfig), "must match"),
        (("all", "d", TinyConfig), "reserved"),
        (("ok", " ", TinyConfig), "description must not be empty"),
        (("ok", "d", NotFrozen), "frozen"),
        (("ok", "d", NoHelp), r"fields \['a'\] of NoHelp lack a help"),
        (("ok", "d", Plain), "must subclass ExperimentConfig"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            reg.register(*args, run)
    reg.register("ok", "d", TinyConfig, run)
    reg.register("ok", "d", TinyConfig, run)  # same function again (module re-import): fine

    def other(cfg, ctx):
        pass

    with pytest.raises(ValueError, match="already registered"):
        reg.register("ok", "d", TinyConfig, other)
    with pytest.raises(ValueError, match="immutable"):
        param([1, 2], "a list")
    with pytest.raises(ValueError, match="help must describe"):
        param(1, "")


def test_online_summary_cell_in_report(tmp_path):
    # The evaluation protocol's online cell: mean with CI over users and over seeds.
    cell = online_summary([np.array([1.0, 3.0]), np.array([2.0, 4.0])]).format(".3g")
    assert cell.startswith("2.5 (95% CI ±") and "users" in cell and "seeds" in cell
