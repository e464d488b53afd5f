"""Two towers and the exact index on devices: the options, bf16, and no torch warnings.

CPU everywhere; the CUDA tests skip without a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from retrieval.index import IndexConfig, build_index
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, fit_two_tower
from simenv.device import resolve_device, to_device
from tests.retrieval.test_train_sparse import _log

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fit(device="cpu", precision="fp32", progress=False, epochs=2):
    world, log, seq = _log()
    torch.manual_seed(0)  # not used by the code (explicit seeds); guards against global draws
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=16, n_items=world.n_items, seed=3),
        user=UserTowerConfig(kind="mean"),
        similarity=SimilarityConfig(kind="cosine", learnable_temperature=True, temperature=None),
    )
    model = TwoTowerModel.build(cfg, None)
    loss = RetrievalLossConfig(
        negatives=NegativeSamplerConfig(in_batch=True, uniform=64, logq="negatives_only")
    )
    tc = TrainConfig(
        epochs=epochs, batch_size=128, lr=1e-2, seed=0, progress=progress, patience=0,
        device=device, precision=precision,
    )  # fmt: skip
    return model, fit_two_tower(model, loss, log, seq, tc)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"device": "gpu"}, "device must be 'cpu', 'cuda', 'cuda:N'"),
        ({"device": 0}, "device must be"),
        ({"precision": "fp16"}, "precision must be one of"),
    ],
)
def test_configs_validate_device_and_precision(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
    if "device" in kw:
        with pytest.raises(ValueError, match=match):
            IndexConfig(**kw)


def test_unavailable_cuda_is_a_clear_error_before_any_work():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"torch sees {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    with pytest.raises(ValueError, match="is not available"):
        build_index(np.ones((4, 2), np.float32), IndexConfig(device=f"cuda:{n}"))
    assert resolve_device("auto").type == ("cuda" if n else "cpu")
    batch = {"a": torch.ones(2), "b": [torch.zeros(1)], "c": 3}
    assert to_device(batch, torch.device("cpu"))["a"] is batch["a"]  # no copy on the CPU


def test_training_emits_no_torch_warning_and_bf16_learns_like_fp32():
    with warnings.catch_warnings():
        # the progress bar read the loss with float(loss): "Converting a tensor with
        # requires_grad=True to a scalar" (issue 13); now nothing may warn
        warnings.simplefilter("error")
        model, fp32 = _fit(progress=True)
    _, bf16 = _fit(device="auto", precision="bf16")  # "auto" is the CPU without a GPU
    a = np.array([h["loss"] for h in fp32.history])
    b = np.array([h["loss"] for h in bf16.history])
    assert np.isfinite(b).all() and b[-1] < b[0] - 0.1
    # bf16 rounds the towers' and the loss's matmuls to 8 mantissa bits (2^-8 = 0.4%);
    # over a few hundred steps the curves drift apart by a few percent at most
    np.testing.assert_allclose(b, a, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # one temperature per step, gathered from the device once per epoch
    assert len(fp32.tau_trajectory) == sum(h["examples"] for h in fp32.history) // 128
    assert fp32.tau_trajectory[-1] == pytest.approx(fp32.history[-1]["tau"], rel=1e-6)


def test_exact_index_on_the_default_device_is_unchanged_by_the_option():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    a = build_index(items, IndexConfig(exact_chunk=128)).search(q, 10, exclude=np.full((7, 1), 3))
    b = build_index(items, IndexConfig(exact_chunk=128, device="auto"))
    got = b.search(q, 10, exclude=np.full((7, 1), 3))
    if b._device.type == "cpu":  # same computation, same kernels: bitwise
        np.testing.assert_array_equal(got[0], a[0])
        np.testing.assert_array_equal(got[1], a[1])


@cuda
def test_cuda_training_and_exact_search_match_cpu():
    _, cpu = _fit(epochs=2)
    model, gpu = _fit(device="cuda", epochs=2)
    assert next(model.parameters()).device.type == "cuda"
    # different random streams (a CUDA generator draws the uniform negatives): same size of
    # progress, not the same numbers
    a = np.array([h["loss"] for h in cpu.history])
    b = np.array([h["loss"] for h in gpu.history])
    np.testing.assert_allclose(b, a, rtol=0.1)
    rng = np.random.default_rng(0)
    items = rng.standard_normal((5000, 32)).astype(np.float32)
    q = rng.standard_normal((64, 32)).astype(np.float32)
    ids_c, s_c = build_index(items).search(q, 20)
    ids_g, s_g = build_index(items, IndexConfig(device="cuda")).search(q, 20)
    np.testing.assert_allclose(s_g, s_c, rtol=0, atol=1e-4)  # float32, two GEMM orders
    assert (ids_g == ids_c).mean() > 0.99  # only near-ties may swap
