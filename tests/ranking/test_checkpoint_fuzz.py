"""Ranker files from outside are untrusted: damaged, truncated or crafted checkpoints give a
clear ValueError, or (bytes torch ignores) exactly the saved ranker; never silently other
weights (torch.load does not check the zip's CRCs; the checkpoint's own SHA-256 does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from ranking import Ranker, RankerConfig, load_ranker, save_ranker
from ranking.train import _payload_digest
from simenv import EnvConfig, World
from tests.simenv.test_export_fuzz import DAMAGE, _damage


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = EnvConfig.small()
    world = World(cfg.world, seed=0, user_model=cfg.user_model)
    ranker = Ranker(world.catalog, RankerConfig(seed=0, mlp=(8,), tower_hidden=16)).eval()
    path = save_ranker(ranker, tmp_path_factory.mktemp("ck") / "r.pt", {"epoch": 2})
    return world, ranker, path.read_bytes()


def _payload(saved, tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(saved[2])
    return torch.load(path, weights_only=True)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(damage=DAMAGE)
def test_damaged_checkpoint_is_an_error_or_exactly_the_ranker(tmp_path, saved, damage):
    world, ranker, raw = saved
    path = tmp_path / "bad.pt"
    path.write_bytes(_damage(raw, damage))
    try:
        loaded, extra = load_ranker(path, world.catalog)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert extra == {"epoch": 2} and loaded.config == ranker.config
    for name, value in ranker.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def _rewrite(payload, path, digest=True):
    if digest:
        payload["sha256"] = _payload_digest(payload)
    torch.save(payload, path)
    return path


def test_crafted_checkpoints_are_refused_with_the_reason(tmp_path, saved):
    world = saved[0]
    cases = []
    p = _payload(saved, tmp_path)
    p["state_dict"]["out.weight"] = p["state_dict"]["out.weight"][:, :-1]
    cases.append((p, "weight 'out.weight' is torch.float32 \\(1, 7\\), this config needs"))
    p = _payload(saved, tmp_path)
    p["state_dict"]["out.bias"] = torch.full_like(p["state_dict"]["out.bias"], float("nan"))
    cases.append((p, "weight 'out.bias' holds NaN"))
    p = _payload(saved, tmp_path)
    del p["state_dict"]["out.bias"]
    cases.append((p, r"weights missing \['out.bias'\]"))
    p = _payload(saved, tmp_path)
    p["config"]["hidden"] = 3
    cases.append((p, "hidden"))
    p = _payload(saved, tmp_path)
    p["extra"] = [1, 2]
    cases.append((p, "field 'extra' is missing or not a dict"))
    for i, (payload, match) in enumerate(cases):
        path = _rewrite(payload, tmp_path / f"c{i}.pt")
        with pytest.raises(ValueError, match=match):
            load_ranker(path, world.catalog)
    # a weight changed without a matching digest: the damage a flipped byte does
    p = _payload(saved, tmp_path)
    p["state_dict"]["out.bias"] += 1.0
    with pytest.raises(ValueError, match="do not match the SHA-256"):
        load_ranker(_rewrite(p, tmp_path / "nodigest.pt", digest=False), world.catalog)


def test_version_1_files_without_a_digest_still_load(tmp_path, saved):
    world, ranker, _ = saved
    p = _payload(saved, tmp_path)
    p["version"] = 1
    del p["sha256"]
    loaded, _ = load_ranker(_rewrite(p, tmp_path / "v1.pt", digest=False), world.catalog)
    w = loaded.state_dict()["out.weight"].numpy()
    np.testing.assert_array_equal(w, ranker.state_dict()["out.weight"].numpy())
