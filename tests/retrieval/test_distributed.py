"""Cross-device negatives: two gloo processes against one process on the concatenated batch."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval.distributed import (
    all_gather_no_grad,
    all_gather_with_local_grad,
    gather_sizes,
    is_distributed,
    world_info,
)
from retrieval.losses import NegativeSamplerConfig, SampledSoftmaxLoss
from retrieval.similarity import Similarity, SimilarityConfig

N_ITEMS, D = 40, 4
SCENARIOS = {"equal": (4, 4), "unequal": (5, 3)}


def _data(sizes):
    g = torch.Generator().manual_seed(0)
    b = sum(sizes)
    users = torch.randn(b, D, generator=g, dtype=torch.float64)
    table = torch.randn(N_ITEMS, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 10, (b,), generator=g)  # duplicates across the two processes
    freq = torch.rand(N_ITEMS, generator=g, dtype=torch.float64)
    return users, table, pos, freq


def _modules(cross_device):
    sim = Similarity(
        SimilarityConfig(
            kind="cosine", learnable_temperature=True, temperature=None, init_log_tau=-1
        )
    ).double()
    cfg = NegativeSamplerConfig(
        uniform=5, in_batch=True, cross_device=cross_device, memory_queue=32, logq="negatives_only"
    )
    return sim, SampledSoftmaxLoss(cfg, N_ITEMS, sim)


def _step(users, table, pos, freq, reduction, cross_device):
    """One loss + backward; returns loss, grads of users, table, log_tau, and queue ids."""
    sim, loss_fn = _modules(cross_device)
    u = users.clone().requires_grad_()
    t = table.clone().requires_grad_()
    gen = torch.Generator().manual_seed(11)  # same uniform negatives on every process
    loss = loss_fn(u, pos, t[pos], lambda i: t[i], gen, freq, reduction=reduction)
    loss.backward()
    return {
        "loss": loss.detach(),
        "users": u.grad,
        "table": t.grad,
        "log_tau": sim.log_tau.grad.clone(),
        "queue": loss_fn.queue_contents()[1],
    }


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        out = {"world_info": world_info(), "is_distributed": is_distributed()}
        for name, sizes in SCENARIOS.items():
            users, table, pos, freq = _data(sizes)
            lo = sum(sizes[:rank])
            sl = slice(lo, lo + sizes[rank])
            reduction = "mean" if name == "equal" else "sum"
            out[name] = _step(users[sl], table, pos[sl], freq, reduction, cross_device=True)
        # The gather itself: forward order, and what backward returns with and without the
        # cross-process gradient sum. Process r's loss weighs row j of the gathered tensor by
        # (r + 1) * (j + 1).
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        sizes = gather_sizes(x.shape[0])
        for exact in (True, False):
            x.grad = None
            y = all_gather_with_local_grad(x, sizes, sum_grads_across_ranks=exact)
            w = (rank + 1) * torch.arange(1, y.shape[0] + 1, dtype=torch.float32)
            (y * w[:, None]).sum().backward()
            out[f"gather_{exact}"] = (y.detach(), x.grad.clone())
        out["ids"] = all_gather_no_grad(torch.tensor([10 * rank + 1, 10 * rank + 2][: rank + 1]))
        torch.save(out, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(outdir)), nprocs=2, join=True)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_world_info(ranks):
    assert [r["world_info"] for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["is_distributed"] for r in ranks)
    assert world_info() == (0, 1) and not is_distributed()  # this process has no group


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cross_device_loss_and_gradients_equal_single_process(ranks, name):
    sizes = SCENARIOS[name]
    users, table, pos, freq = _data(sizes)
    reduction = "mean" if name == "equal" else "sum"
    ref = _step(users, table, pos, freq, reduction, cross_device=False)
    world = len(sizes)
    if reduction == "mean":
        # Loss averaged over processes; gradients of (loss / world) summed over processes,
        # which is what data-parallel averaging of gradients computes.
        loss = sum(r[name]["loss"] for r in ranks) / world
        scale = 1.0 / world
    else:
        loss = sum(r[name]["loss"] for r in ranks)
        scale = 1.0
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-12, atol=1e-12)
    for key in ("table", "log_tau"):
        total = sum(r[name][key] for r in ranks) * scale
        torch.testing.assert_close(total, ref[key], rtol=1e-10, atol=1e-12)
    user_grads = torch.cat([r[name]["users"] for r in ranks]) * scale
    torch.testing.assert_close(user_grads, ref["users"], rtol=1e-10, atol=1e-12)
    # The memory queue holds every process's positives, in rank order, on every process.
    for r in ranks:
        assert r[name]["queue"].tolist() == pos.tolist()


def test_gather_backward_sums_gradients_over_processes(ranks):
    # Gathered rows: [0, 0] from rank 0, then [1, 1] twice from rank 1.
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for r in ranks:
        torch.testing.assert_close(r["gather_True"][0], expected)
    # d/dy_j of process r's loss is (r + 1) * (j + 1); summed over r: 3 * (j + 1).
    torch.testing.assert_close(ranks[0]["gather_True"][1], torch.full((1, 2), 3.0))
    torch.testing.assert_close(ranks[1]["gather_True"][1], torch.tensor([[6.0, 6.0], [9.0, 9.0]]))
    # Without the sum, only the process's own loss: (r + 1) * (j + 1) on its own rows.
    torch.testing.assert_close(ranks[0]["gather_False"][1], torch.full((1, 2), 1.0))
    torch.testing.assert_close(ranks[1]["gather_False"][1], torch.tensor([[4.0, 4.0], [6.0, 6.0]]))
    assert ranks[0]["ids"].tolist() == ranks[1]["ids"].tolist() == [1, 11, 12]


def test_without_process_group_gather_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_local_grad(x) is x
    assert gather_sizes(3) == [3]
    _, table, pos, freq = _data((4, 4))
    users = _data((4, 4))[0]
    a = _step(users, table, pos, freq, "mean", cross_device=True)
    b = _step(users, table, pos, freq, "mean", cross_device=False)
    torch.testing.assert_close(a["loss"], b["loss"])
