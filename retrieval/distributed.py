"""Cross-device gathering for the cross-device negatives of the sampled softmax.

With data-parallel training each process holds its own batch. The lecture's cross-device
negatives use the other processes' positives too: every process gathers the item vectors of
all processes' positives and scores its users against them.

:func:`all_gather_with_local_grad` concatenates all processes' tensors; autograd reaches only
the local slice (the other slices belong to other processes' graphs). Its backward sums the
gradient of the gathered tensor over processes before keeping the local slice, so that the
local item vectors also receive the gradient of the *other* processes' losses, in which they
act as negatives. The result is exact: with the usual data-parallel gradient averaging, the
update equals the single-process update on the concatenated batch (the test in
``tests/retrieval/test_distributed.py`` checks this with two processes). Without that backward
reduction (``sum_grads_across_ranks=False``) each process would see only its own loss's
gradient on its items, which drops the cross terms of an asymmetric user-to-item loss.

All functions fall back to the identity when no process group is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env",
    "is_distributed",
    "world_info",
    "gather_sizes",
    "all_gather_with_local_grad",
    "all_gather_no_grad",
]


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group ``torchrun`` describes (its environment variables); the device.

    Backend: nccl when the device is a GPU, else gloo. On GPUs each process takes the GPU of
    its ``LOCAL_RANK``. Without torchrun's variables (a plain ``python`` run) nothing is
    initialised and the device is returned for one process. Pass the returned device as
    ``TrainConfig(device=str(dev))`` / ``RankerTrainConfig(device=str(dev))``.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (a GPU when one is visible).
    """
    import os

    from simenv.device import resolve_device

    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n_local: int, device: torch.device | str = "cpu") -> list[int]:
    """Every process's leading size (one small collective), so batches may differ in size."""
    if not is_distributed():
        return [int(n_local)]
    _, world = world_info()
    mine = torch.tensor([int(n_local)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather along dim 0 with per-process sizes ``sizes`` (pads to the largest)."""
    n_max = max(sizes)
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


class _AllGatherLocalGrad(torch.autograd.Function):
    """Forward: concatenate all processes' rows. Backward: gradient of the local rows only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], reduce_grad: bool) -> torch.Tensor:  # type: ignore[override]
        rank, _ = world_info()
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        ctx.reduce_grad = reduce_grad
        return _padded_all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if ctx.reduce_grad:
            # Every process's loss touched our rows: sum those gradients before slicing.
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None, None


def all_gather_with_local_grad(
    x: torch.Tensor,
    sizes: list[int] | None = None,
    sum_grads_across_ranks: bool = True,
) -> torch.Tensor:
    """Concatenate every process's ``x`` along dim 0, in rank order.

    Args:
        x: ``(n_local, ...)`` local tensor; leading sizes may differ between processes.
        sizes: every process's leading size, if already known (see :func:`gather_sizes`);
            saves one collective.
        sum_grads_across_ranks: in backward, sum the gathered tensor's gradient over
            processes before taking the local slice (exact data-parallel gradients; one
            all-reduce of the gathered size). False keeps only this process's own gradient.

    Returns:
        ``(sum(sizes), ...)``; the local rows start at ``sum(sizes[:rank])``. Gradient flows
        into ``x`` only. Without a process group, ``x`` itself.
    """
    if not is_distributed():
        return x
    rank, world = world_info()
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes must list {world} sizes with sizes[rank={rank}] == {x.shape[0]}, got {sizes}"
        )
    return _AllGatherLocalGrad.apply(x, list(sizes), bool(sum_grads_across_ranks))


def all_gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every process's ``x`` along dim 0 (no autograd; for ids and the like)."""
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        return _padded_all_gather(x.detach(), sizes)
