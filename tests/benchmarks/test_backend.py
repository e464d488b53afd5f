"""`python -m benchmarks ... --backend processes`: same reports as the serial run."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.registry import ExperimentConfig, Registry, param

VOLATILE = {"started_at", "wall_time_s", "timings_s", "versions", "git", "machine", "argv"}


@dataclass(frozen=True)
class DrawConfig(ExperimentConfig):
    """Config of the backend test experiments."""

    n: int = param(50, "values drawn per seed")

    @classmethod
    def quick(cls) -> DrawConfig:
        return replace(cls(), n=30)


def run_draw(cfg: DrawConfig, ctx) -> None:
    rows = [
        {"world": "w", "policy": "p", "model": ctx.name, "seed": s,
         "x": float(ctx.rng(s, ctx.name).random(cfg.n).mean()), "wall_s": 0.0}
        for s in ctx.seeds
    ]  # fmt: skip
    ctx.report.seed_table("X", rows, ["x"])
    ctx.report.add_result("per_seed", [r["x"] for r in rows])
    ctx.report.headline(f"x {rows[0]['x']:.6f}")


def run_raises(cfg: DrawConfig, ctx) -> None:
    raise RuntimeError("boom on purpose")


def make_registry() -> Registry:
    reg = Registry()
    reg.register("draw-a", "Draws seeded values.", DrawConfig, run_draw)
    reg.register("draw-b", "Draws other seeded values.", DrawConfig, run_draw)
    reg.register("raises", "Raises on purpose.", DrawConfig, run_raises)
    return reg


def masked(out: Path, name: str) -> dict:
    doc = json.loads((out / name / "results.json").read_text())
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def run_all(out: Path, *extra: str) -> int:
    args = ["all", "--quick", "--seeds", "2", "--quiet", "--out", str(out), *extra]
    return main(args, registry=make_registry(), modules=[])


def check_same_as_serial(serial: Path, other: Path) -> None:
    for name in ("draw-a", "draw-b"):
        a, b = masked(serial, name), masked(other, name)
        assert a["status"] == "ok" and a == b, name
    assert masked(other, "raises")["status"] == "error"
    assert "boom on purpose" in masked(other, "raises")["error"]
    rows = [ln for ln in (other / "index.md").read_text().splitlines() if ln.startswith("| [")]
    assert [r.split("]")[0] for r in rows] == ["| [draw-a", "| [draw-b", "| [raises"]


def test_processes_backend_writes_the_serial_reports(tmp_path, capsys):
    assert run_all(tmp_path / "serial") == 1  # `raises` fails; the others still run
    assert run_all(tmp_path / "proc", "--backend", "processes", "--workers", "2") == 1
    err = capsys.readouterr().err
    assert "1 experiment(s) failed: raises" in err and "raises: FAILED" in err
    check_same_as_serial(tmp_path / "serial", tmp_path / "proc")
    a = masked(tmp_path / "serial", "draw-a")
    # the reproducing command names no backend: the backend does not change the numbers
    assert a["command"].startswith("python -m benchmarks draw-a --quick --seeds 2")
    assert "--backend" not in a["command"] and "--workers" not in a["command"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--backend", "spark"], "invalid choice: 'spark'"),
        (["--backend", "processes", "--workers", "0"], "--workers must be >= 1, got 0"),
    ],
)
def test_bad_backend_options_exit_2(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(["all", "--quick", "--out", str(tmp_path), *args], make_registry(), [])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_costliest_tasks_are_submitted_first_and_outcomes_keep_task_order(tmp_path):
    from benchmarks.parallel import ExperimentTask, run_experiments

    reg = make_registry()
    names, costs = ("draw-a", "draw-b", "raises"), (1.0, 5.0, 3.0)
    tasks = [
        ExperimentTask(
            name=n,
            cfg=DrawConfig.quick(),
            seeds=(0,),
            quick=True,
            command=f"cmd {n}",
            overrides={},
            out_root=tmp_path,
            threads=1,
            argv=[],
            order=names,
            cost=c,
        )  # fmt: skip
        for n, c in zip(names, costs, strict=True)
    ]
    started: list[int] = []
    # serial backend with one worker: tasks finish in submission order
    outs = run_experiments(tasks, reg, "serial", 1, on_done=lambda i, o: started.append(i))
    assert started == [1, 2, 0]  # draw-b (5), raises (3), draw-a (1)
    assert [o.name for o in outs] == list(names)
    assert [o.ok for o in outs] == [True, True, False]
