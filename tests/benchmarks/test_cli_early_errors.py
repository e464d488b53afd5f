"""Argument and config errors of `python -m benchmarks` come before the experiments are
imported (torch and the models: 10-15 s on a busy 2-core machine), and the static manifest
they are checked against agrees with the registry."""

from __future__ import annotations

import typing

import pytest

import benchmarks.__main__ as cli
from benchmarks.manifest import read_manifest, resolve_annotation
from benchmarks.registry import EXPERIMENT_MODULES, REGISTRY, Registry, config_fields


@pytest.fixture
def no_import(monkeypatch):
    """Fail the test if the CLI imports the experiment modules."""

    def load(self, modules):
        raise AssertionError(f"the experiments were imported: {modules}")

    monkeypatch.setattr(Registry, "load", load)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["loses"], "unknown experiment 'loses' (did you mean 'losses'?)"),
        (["nosuch"], "registered: perf-env, losses"),
        (["losses", "--set", "epoch=2"], "unknown config field(s) ['epoch'] for losses"),
        (["losses", "--set", "epochs=two"], "epochs='two' must be an int"),
        (["losses", "--set", "epochs"], "--set expects KEY=VALUE"),
        (["all", "--set", "epochs=1"], "under `all`, --set needs NAME.KEY=VALUE"),
        (["all", "--set", "folding.variants=1,2", "--set", "folding.dims=3"], "'dims'"),
        (["movielens", "--set", "check_size=maybe"], "check_size='maybe' must be a bool"),
        (["all", "--exclude", "scale,anm"], "--exclude: unknown experiment(s) ['anm']"),
    ],
)
def test_name_and_set_errors_before_any_import(no_import, tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_out_pointing_at_a_file_is_refused_first(no_import, tmp_path, capsys):
    file = tmp_path / "reports.md"
    file.write_text("not a folder")
    for out in (file, file / "sub"):
        with pytest.raises(SystemExit) as err:
            cli.main(["losses", "--quick", "--out", str(out)])
        assert err.value.code == 2
        assert str(file) in capsys.readouterr().err
    assert file.read_text() == "not a folder"
    # the same for experiments from another registry
    with pytest.raises(SystemExit):
        cli.main(["tiny", "--out", str(file)], Registry(), [])
    assert cli._out_problem(tmp_path / "new" / "deeper") is None


def test_valid_arguments_pass_the_early_check(tmp_path):
    def args(*argv):
        return cli.build_parser().parse_args([*argv, "--out", str(tmp_path)])

    assert cli._static_problem(args("losses", "--set", "epochs=2", "--set", "lr=0.01")) is None
    assert cli._static_problem(args("all", "--set", "folding.variants=a,b")) is None
    assert cli._static_problem(args("movielens", "--set", "like_threshold=none")) is None


def test_manifest_agrees_with_the_registry():
    manifest = read_manifest(list(EXPERIMENT_MODULES))
    assert manifest is not None
    REGISTRY.load(EXPERIMENT_MODULES)
    assert sorted(manifest) == sorted(REGISTRY.names())  # order: import order of the tests
    for exp in REGISTRY:
        static = manifest[exp.name]
        assert static.module == exp.module
        fields = {f.name: f.type for f in config_fields(exp.config_cls)}
        assert static.fields is not None and set(static.fields) == set(fields), exp.name
        for name, text in static.fields.items():
            tp = resolve_annotation(text)
            if tp is not None:  # what the manifest checks, it reads as the registry does
                assert tp == fields[name] or typing.get_args(tp) == typing.get_args(fields[name]), (
                    exp.name,
                    name,
                )


def test_manifest_gives_up_rather_than_guess():
    assert read_manifest(["benchmarks.no_such_module_xyz"]) is None
    assert resolve_annotation("MyEnum | None") is None
    assert resolve_annotation("tuple[int, ...]") == tuple[int, ...]
