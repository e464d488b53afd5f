"""No choice is made on test data: an experiment's selection is the same when its test set is
poisoned (positives replaced by random items, observations shuffled across users), while its
test metrics change (so the poison reached the report).

Same-seed reruns of the same computation in one process give identical validation scores
(the same code on the same inputs, nothing else differs), so the choices compare exactly.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmarks.paired import choose_on_validation
from benchmarks.registry import REGISTRY, make_config
from benchmarks.runner import run_experiment
from retrieval.data import EvalSet, take_obs


@pytest.fixture(scope="module", autouse=True)
def _registered():
    REGISTRY.load(["benchmarks.losses", "benchmarks.user_towers"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poisoned(ev: EvalSet, n_items: int, seed: int = 123) -> EvalSet:
    """The same users with random held-out positives and another user's observation."""
    rng = np.random.default_rng(seed)
    shuffled = take_obs(ev.obs, rng.permutation(len(ev)))
    pos = np.where(ev.positives >= 0, rng.integers(0, n_items, ev.positives.shape), -1)
    first = np.argmax(pos >= 0, axis=1)
    return EvalSet(shuffled, pos, pos[np.arange(len(ev)), first], ev.user, ev.time)


def _run(name: str, overrides: dict, tmp_path, tag: str) -> dict:
    exp = REGISTRY.get(name)
    cfg = make_config(exp.config_cls, quick=True, overrides=overrides)
    out = run_experiment(
        exp, cfg, out_root=tmp_path / tag, seeds=(0,), quick=True,
        command=f"python -m benchmarks {name} --quick (selection test, {tag})",
        overrides=overrides, threads=1, quiet=True,
    )  # fmt: skip
    doc = json.loads((tmp_path / tag / name / "results.json").read_text(encoding="utf-8"))
    assert out.ok, doc.get("error")
    return doc


def _poison(monkeypatch, module) -> None:
    real = module.offline_data

    def offline_data(*args, **kwargs):
        data = real(*args, **kwargs)
        return dataclasses.replace(
            data, test_set=poisoned(data.test_set, data.world.n_items)
        )  # a copy: the cached data stays clean

    monkeypatch.setattr(module, "offline_data", offline_data)


def _test_recall(doc: dict) -> dict[str, float]:
    return {r["model"]: r["recall@100"] for r in doc["results"]["rows"]}


def test_losses_chooses_the_best_softmax_without_the_test_set(tmp_path, monkeypatch):
    import benchmarks.losses as losses

    overrides = {
        "episodes_per_user": "0.2", "epochs": "1", "batch_size": "512", "dim": "8",
        "variants": "softmax in-batch (no logQ),softmax in-batch (logQ3),BCE (mixed neg.)",
    }  # fmt: skip
    clean = _run("losses", overrides, tmp_path, "clean")
    _poison(monkeypatch, losses)
    dirty = _run("losses", overrides, tmp_path, "poisoned")
    assert clean["results"]["selection"] == dirty["results"]["selection"]
    assert clean["results"]["selection"]["best_softmax"] in (
        "softmax in-batch (no logQ)",
        "softmax in-batch (logQ3)",
    )
    assert _test_recall(clean) != _test_recall(dirty)  # the poison reached the test metrics


def test_choose_on_validation():
    assert choose_on_validation({"a": [0.1, 0.3], "b": [0.25, 0.2], "c": [0.0, 0.1]}) == "b"
    assert choose_on_validation({"a": [1.0], "b": [2.0]}, higher_is_better=False) == "a"
    assert choose_on_validation({"a": [0.5], "b": [0.5]}) == "a"  # ties: the first
    with pytest.raises(ValueError, match="finite validation scores"):
        choose_on_validation({"a": [float("nan")]})
    with pytest.raises(ValueError, match="at least one candidate"):
        choose_on_validation({})
