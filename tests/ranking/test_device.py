"""The ranker on devices: the generic scoring path, bf16, the device option, safe checkpoints.

The generic path is what a GPU runs; here it is forced on the CPU. CUDA tests skip without a GPU.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ranking import Ranker, RankerConfig, RankerTrainConfig, load_ranker, save_ranker, train_ranker
from simenv.types import Obs
from tests.ranking.test_model import CONFIGS, data, trained_like  # noqa: F401 - fixture
from tests.ranking.test_train import small  # noqa: F401 - fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# float32 rounding of the pair network: each score is a chain of ~5 layers of dot products of
# length <= 33, each rounding at eps = 2^-24 relative to its magnitude, so the two orders of
# summation (fast blocks vs generic blocks) differ by at most ~ depth * sqrt(width) * eps ~
# 5 * 6 * 6e-8 = 2e-6 of the score scale (measured: <= 8.4e-7); bound 1e-5 of the scale.
FP32_REL = 1e-5
# bfloat16 keeps 8 mantissa bits (eps = 2^-8 = 3.9e-3): the same chain errs ~1e-2 relative
# (measured: <= 1.8e-2); bound 0.1 of the scale (a bf16 bug, e.g. a lost term, exceeds it).
BF16_REL = 0.1


def _candidates(obs, n, seed=0):
    rng = np.random.default_rng(seed)
    b = obs[Obs.ITEMS].shape[0]
    cand = rng.integers(-1, n, size=(b, 41))  # padding, duplicates, unreleased items
    cand[:, :16] = obs[Obs.ITEMS][:, :16]  # history items: the item-level crosses
    return cand


def _close(got, want, rel):
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin)  # -inf exactly where it belongs
    np.testing.assert_array_equal(got[~fin], want[~fin])
    scale = float(np.abs(want[fin]).max())
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=rel * scale)


@pytest.mark.parametrize("name", ["default", "heads", "deep"])
def test_generic_path_agrees_with_fast_path_and_with_itself(data, name):  # noqa: F811
    world, _, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, CONFIGS[name], stats))
    fast_all = ranker.score_all(obs)
    cand = _candidates(obs, world.n_items)
    fast_cand = ranker.score(obs, cand)
    ranker.set_scoring(path="generic")
    gen_all = ranker.score_all(obs)
    gen_cand = ranker.score(obs, cand)
    _close(gen_all, fast_all, FP32_REL)
    _close(gen_cand, fast_cand, FP32_REL)
    # score and score_all agree on the generic path (what a GPU guarantees)
    want = np.where(cand >= 0, np.take_along_axis(gen_all, np.maximum(cand, 0), axis=1), -np.inf)
    _close(gen_cand, want, FP32_REL)
    # head outputs and top_k take the same path
    heads = ranker.head_outputs(obs, cand)
    assert heads.shape == (*cand.shape, ranker.n_heads)
    ids, val = ranker.top_k(obs, 5)
    np.testing.assert_allclose(val, -np.sort(-gen_all, axis=1)[:, :5], rtol=0, atol=0)
    # bf16 autocast: the same scores within bfloat16 rounding
    ranker.set_scoring(precision="bf16")
    _close(ranker.score_all(obs), fast_all, BF16_REL)


def test_scoring_options_are_validated(data):  # noqa: F811
    world, _, obs, stats = data
    ranker = Ranker(world.catalog, RankerConfig(), stats)
    with pytest.raises(ValueError, match="precision must be one of"):
        ranker.set_scoring(precision="fp16")
    with pytest.raises(ValueError, match="path must be"):
        ranker.set_scoring(path="gpu")
    ranker.set_scoring(precision="bf16", path="fast")
    with pytest.raises(ValueError, match="fast scoring path runs on the CPU in fp32 only"):
        ranker.score_all(obs)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"device": "gpu"}, "device must be 'cpu', 'cuda', 'cuda:N'"),
        ({"device": "cuda:-1"}, "device must be"),
        ({"precision": "fp16"}, "precision must be one of"),
    ],
)
def test_train_config_validates_device_and_precision(kw, match):
    with pytest.raises(ValueError, match=match):
        RankerTrainConfig(**kw)


def test_unavailable_device_is_a_clear_error(small):  # noqa: F811
    world, _, train, _, seq = small
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = RankerTrainConfig(device=f"cuda:{n}", epochs=1, history_length=16, progress=False)
    with pytest.raises(ValueError, match="is not available: torch sees"):
        train_ranker(Ranker(world.catalog), train, seq, cfg)


def test_bf16_training_learns_like_fp32(small):  # noqa: F811
    world, _, train, _, seq = small
    losses = {}
    for precision in ("fp32", "bf16"):
        ranker = Ranker(world.catalog, RankerConfig(seed=0))
        cfg = RankerTrainConfig(
            epochs=2,
            batch_size=128,
            history_length=16,
            max_slates_per_epoch=512,
            precision=precision,
            device="auto" if precision == "bf16" else "cpu",  # "auto" is the CPU here
            progress=False,
        )
        hist = train_ranker(ranker, train, seq, cfg)
        losses[precision] = hist.train_loss
        assert all(p.dtype == torch.float32 for p in ranker.parameters())  # weights stay fp32
    # bf16 rounds the forward (8 mantissa bits), so the curves differ slightly; both learn
    assert losses["bf16"][-1] < losses["bf16"][0]
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)


def test_checkpoint_is_loaded_without_unpickling_code(small, tmp_path):  # noqa: F811
    world, _, _, _, _ = small
    path = save_ranker(Ranker(world.catalog), tmp_path / "r.pt", extra={"epoch": 3})
    assert load_ranker(path, world.catalog)[1] == {"epoch": 3}
    with pytest.raises(ValueError, match="plain data"):
        save_ranker(Ranker(world.catalog), tmp_path / "x.pt", extra={"obj": object()})

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"format": "ranking.Ranker", "boom": Boom()}, protocol=2))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_ranker(crafted, world.catalog)


@cuda
def test_cuda_training_and_scoring_match_cpu(small):  # noqa: F811
    world, _, train, valid, seq = small
    ranker = Ranker(world.catalog, RankerConfig(seed=0))
    cfg = RankerTrainConfig(
        epochs=1, batch_size=128, history_length=16, device="cuda", progress=False
    )
    train_ranker(ranker, train, seq, cfg, valid)
    assert ranker.device.type == "cuda"
    from ranking.train import slate_data

    obs = {k: v[:32] for k, v in slate_data(valid, seq, 16).obs.items()}
    on_gpu = ranker.score_all(obs)
    cand = _candidates(obs, world.n_items)
    gpu_cand = ranker.score(obs, cand)
    want = np.where(cand >= 0, np.take_along_axis(on_gpu, np.maximum(cand, 0), axis=1), -np.inf)
    _close(gpu_cand, want, FP32_REL)
    ranker.to("cpu")
    _close(on_gpu, ranker.score_all(obs), FP32_REL)
