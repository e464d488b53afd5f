"""Devices and numeric precision of the torch code (training and scoring), in one place.

The simulator itself is numpy; retrieval, the ranker and distillation run torch on a device
the user names in their configs: ``"cpu"`` (the default), ``"cuda"``, ``"cuda:N"`` or
``"auto"`` (the first GPU when one is visible, else the CPU). Precision ``"fp32"`` (the
default) or ``"bf16"``: bfloat16 autocast of the matmuls (``torch.autocast``), parameters and
optimiser state stay float32. Data crosses the simenv boundary as numpy, moves to the device
in one place per training loop (:func:`to_device`), and results come back with ``.cpu()``.

Configs validate the *spelling* of a device in ``__post_init__`` (:func:`check_device`), so a
config naming ``"cuda"`` can be built and saved on a machine without a GPU;
:func:`resolve_device` raises a clear ``ValueError`` when the work starts there.

torch is imported inside the functions: ``import simenv`` stays free of torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PRECISIONS",
    "check_device",
    "check_precision",
    "resolve_device",
    "autocast",
    "to_device",
]

PRECISIONS = ("fp32", "bf16")
_DEVICE = re.compile(r"^(cpu|cuda|auto|cuda:\d+)$")


def check_device(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Only the spelling is checked (no GPU needed); :func:`resolve_device` checks availability.
    """
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(
            f"{name} must be 'cpu', 'cuda', 'cuda:N' (N >= 0) or 'auto', got {value!r}"
        )


def check_precision(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`PRECISIONS`."""
    if value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {PRECISIONS}, got {value!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` a config's device string names.

    ``"auto"``: ``cuda`` when a GPU is visible, else ``cpu``. ``"cuda"`` / ``"cuda:N"`` without
    such a GPU raise ``ValueError`` (naming how many GPUs torch sees).
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    check_device("device", device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= n:
            raise ValueError(
                f"device {device!r} is not available: torch sees {n} CUDA device(s) "
                f"(use 'cpu' or 'auto')"
            )
    return dev


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` to bfloat16 on ``device`` when ``precision == "bf16"``, else nothing.

    Under autocast the matmuls and convolutions run in bfloat16 and reductions in float32;
    parameters, gradients and optimiser state stay float32 (no loss scaling is needed:
    bfloat16 has float32's exponent range).
    """
    check_precision("precision", precision)
    if precision == "fp32":
        yield
        return
    import torch

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them) on ``device``.

    Host-to-GPU copies are ``non_blocking`` (they overlap with compute when the source is
    pinned); on the CPU this returns the same tensors.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
