"""Two-tower checkpoints: the project's one format, loaded without unpickling code."""

from __future__ import annotations

import pickle

import pytest
import torch

from ranking import Ranker, save_ranker
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.train import load_checkpoint, save_checkpoint
from simenv import World, WorldConfig
from simenv.checkpoint import CHECKPOINT_VERSION


@pytest.fixture(scope="module")
def catalogs():
    return World(WorldConfig.small(), seed=0).catalog, World(WorldConfig.small(), seed=2).catalog


def test_round_trip_restores_weights_and_checks_the_catalog(catalogs, tmp_path):
    catalog, other = catalogs
    model = TwoTowerModel.build(TwoTowerConfig(), catalog)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    path = save_checkpoint(model, tmp_path / "m.pt", {"epoch": 2}, catalog=catalog)
    fresh = TwoTowerModel.build(TwoTowerConfig(), catalog)
    payload = load_checkpoint(fresh, path, catalog)
    assert payload["format"] == "retrieval.TwoTowerModel"
    assert payload["version"] == CHECKPOINT_VERSION and payload["extra"] == {"epoch": 2}
    assert payload["config"] == TwoTowerConfig().to_dict()
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # a copy of the saved tensors: bitwise
    with pytest.raises(ValueError, match="another catalog"):
        load_checkpoint(fresh, path, other)
    small = TwoTowerModel.build(TwoTowerConfig(), World(WorldConfig.small(n_items=50)).catalog)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(small, path)
    # a NaN weight (with a matching digest: crafted, not damaged) is refused before loading
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    from simenv.checkpoint import payload_digest

    payload["sha256"] = payload_digest(payload)
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="holds NaN"):
        load_checkpoint(fresh, tmp_path / "nan.pt")
    # a flipped value without a matching digest: the damage a bad byte does
    payload["state_dict"][key] = torch.zeros_like(payload["state_dict"][key])
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="do not match the SHA-256"):
        load_checkpoint(fresh, tmp_path / "damaged.pt")


def test_foreign_crafted_and_missing_files_are_refused(catalogs, tmp_path):
    catalog, _ = catalogs
    model = TwoTowerModel.build(TwoTowerConfig(), catalog)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"state_dict": Boom()}, protocol=2))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(model, crafted)
    ranker_file = save_ranker(Ranker(catalog), tmp_path / "r.pt")
    with pytest.raises(ValueError, match="not a 'retrieval.TwoTowerModel' checkpoint"):
        load_checkpoint(model, ranker_file)
    torch.save({"state_dict": {}}, tmp_path / "old.pt")  # the format before versions
    with pytest.raises(ValueError, match="no format field"):
        load_checkpoint(model, tmp_path / "old.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="plain data"):
        save_checkpoint(model, tmp_path / "x.pt", {"f": lambda: 0})
