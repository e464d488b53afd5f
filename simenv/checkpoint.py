"""One checkpoint format for every torch model of the project (two towers, ranker).

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "ranking.Ranker" | "retrieval.TwoTowerModel" | ...,  # what it holds
     "version": 2,                                                   # CHECKPOINT_VERSION
     "config": {...} | None,     # the model's config as plain data (dataclasses.asdict)
     "catalog": {...} | None,    # catalog_fingerprint of the catalog it was trained on
     "state_dict": {...},        # tensors only
     "extra": {...},             # epoch, metrics, ...: plain data
     "sha256": "..."}            # payload_digest of config, catalog, weights and extra

It is written atomically (:func:`simenv.atomic.atomic_write`) and read with
``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so a
crafted file cannot run code. ``torch.load`` does not check the zip's CRCs (a damaged byte in
a tensor loads silently as another weight), so version 2 stores a SHA-256 of the contents and
the reader recomputes it. The reader checks the format name, the version (1: without the
digest), the fields' types, the digest and (when the caller passes its catalog) that the
checkpoint belongs to that catalog; :func:`check_weights` checks a state dict's names, dtypes,
shapes and finiteness against a model's. Every failure is a ``ValueError`` naming the file.

torch is imported inside the functions: ``import simenv`` stays free of torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from simenv.atomic import atomic_write
from simenv.types import ItemCatalog

__all__ = [
    "CHECKPOINT_VERSION",
    "catalog_fingerprint",
    "payload_digest",
    "save_checkpoint",
    "load_checkpoint",
    "check_weights",
]

CHECKPOINT_VERSION = 2  # 2: a SHA-256 of config, catalog, weights and extra (1: without it)
_PLAIN = (str, int, float, bool, type(None))


def catalog_fingerprint(catalog: ItemCatalog) -> dict[str, Any]:
    """Sizes and a SHA-256 of the catalog's arrays: a checkpoint belongs to one catalog."""
    h = hashlib.sha256()
    for a in (catalog.title_tokens, catalog.categorical, catalog.release_time):
        arr = np.ascontiguousarray(a)
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return {
        "n_items": int(catalog.n_items),
        "vocab_size": int(catalog.vocab_size),
        "categorical_names": list(catalog.categorical_names),
        "categorical_cardinalities": [int(c) for c in catalog.categorical_cardinalities],
        "sha256": h.hexdigest(),
    }


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's config, catalog fingerprint, weights and extra.

    ``torch.load`` does not check the zip's CRCs: a damaged byte in a tensor loads silently as
    another weight. This digest, stored in the file and recomputed on load, catches it.
    """
    import torch

    h = hashlib.sha256()
    for key in ("config", "catalog", "extra"):
        h.update(json.dumps(payload[key], sort_keys=True, default=repr).encode())
    state = payload["state_dict"]
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_weights(path: str | os.PathLike[str], want: dict[str, Any], got: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``got`` has ``want``'s names, dtypes, shapes, finite floats.

    Args:
        path: the file (named in the message).
        want: the state dict of a freshly built model of the checkpoint's config.
        got: the loaded state dict.
    """
    import torch

    if set(want) != set(got):
        missing, unknown = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(f"{path}: weights missing {missing}, unknown {unknown}")
    for name, ref in want.items():
        t = got[name]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(
                f"{path}: weight {name!r} is {what}, this config needs {ref.dtype} "
                f"{tuple(ref.shape)}"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: weight {name!r} holds NaN or infinite values")


def _check_plain(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is plain data (what ``weights_only`` loads)."""
    import torch

    if isinstance(value, (*_PLAIN, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{name} keys must be str or int, got {type(k).__name__}")
            _check_plain(f"{name}[{k!r}]", v)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(f"{name}[{i}]", v)
        return
    raise ValueError(
        f"{name} must be plain data (str, int, float, bool, None, tensors, lists, tuples, "
        f"dicts) to be loadable with weights_only=True, got {type(value).__name__}"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    format: str,
    state_dict: dict[str, Any],
    config: dict[str, Any] | None,
    catalog: ItemCatalog | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (see the module docstring) atomically; returns its path.

    Args:
        path: the file.
        format: what it holds, e.g. ``"ranking.Ranker"``.
        state_dict: the model's ``state_dict()`` (saved from the CPU).
        config: the model's config as plain data.
        catalog: the catalog the model belongs to (its fingerprint is stored), or None.
        extra: plain data stored beside (epoch, metrics, training config).

    Raises:
        ValueError: ``config`` or ``extra`` holds something ``weights_only`` cannot load.
    """
    import torch

    _check_plain("config", config)
    _check_plain("extra", extra or {})
    payload = {
        "format": str(format),
        "version": CHECKPOINT_VERSION,
        "config": config,
        "catalog": None if catalog is None else catalog_fingerprint(catalog),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "extra": extra or {},
    }
    payload["sha256"] = payload_digest(payload)
    return atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(
    path: str | os.PathLike[str], format: str, catalog: ItemCatalog | None = None
) -> dict[str, Any]:
    """Read and check a checkpoint of :func:`save_checkpoint`; returns its payload (CPU tensors).

    Args:
        path: the file.
        format: the format name the caller expects.
        catalog: when given, the checkpoint must have been saved for this catalog (same
            fingerprint; a checkpoint saved without one must have as many items).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable or foreign file, another format or version, another catalog.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or crafted file
        raise ValueError(f"{path} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{path} is not a {format!r} checkpoint (no format field)")
    if payload["format"] != format:
        raise ValueError(f"{path} is not a {format!r} checkpoint (it holds {payload['format']!r})")
    if payload.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(
            f"{path} has checkpoint version {payload.get('version')!r}, this code reads "
            f"versions 1 and {CHECKPOINT_VERSION}"
        )
    for key, none_ok in (("config", True), ("catalog", True), ("state_dict", False),
                         ("extra", False)):  # fmt: skip
        v = payload.get(key)
        if not (isinstance(v, dict) or (none_ok and key in payload and v is None)):
            raise ValueError(f"{path}: field {key!r} is missing or not a dict")
    if payload["version"] >= 2:
        try:
            ok = payload.get("sha256") == payload_digest(payload)
        except (TypeError, AttributeError, ValueError, RuntimeError) as e:  # odd field types
            raise ValueError(f"{path} is a damaged checkpoint: {type(e).__name__}: {e}") from e
        if not ok:
            raise ValueError(
                f"{path} is damaged: its weights, config or extra do not match the SHA-256 "
                "saved with them"
            )
    saved = payload.get("catalog")
    if catalog is not None:
        fp = catalog_fingerprint(catalog)
        if saved is None:
            ok = True  # saved without a catalog: the state dict's shapes check the size
        elif not isinstance(saved, dict):
            raise ValueError(f"{path} is a damaged checkpoint: catalog is not a dict")
        else:
            ok = saved == fp
        if not ok:
            raise ValueError(
                f"{path} was saved for another catalog ({saved.get('n_items')} items, sha256 "
                f"{str(saved.get('sha256'))[:12]}...), not this one ({fp['n_items']} items, "
                f"sha256 {fp['sha256'][:12]}...)"
            )
    return payload
