"""A log on disk as memory-mapped columns: for logs that should not be held in memory twice.

:meth:`ImpressionLog.save` writes one compressed-free ``.npz`` that must be read whole. A
**log store** is a folder with one raw little-endian binary file per column plus a JSON header;
:func:`open_log_store` maps the columns read-only (``numpy.memmap``), so a 100M-row log opens
instantly and only the pages a computation touches are read. Logs are appended chunk by chunk
(:class:`LogStoreWriter`), so neither writing nor merging needs the whole log in memory.

Layout of ``PATH/``::

    header.json               {"format": "simenv.LogStore", "version": 1, "n_rows": N,
                               "columns": {name: dtype}, "candidates": null | {"rows": R,
                               "width": K}, "meta": {...}}
    col.<name>.bin            N values of the column's dtype (see simenv.log), little-endian
    candidates.bin            R x K int64, row-major (only with candidate sets)
    candidate_request.bin     R int64

The folder is written under a temporary name and renamed into place when complete (the header
last), so a store that exists is whole; :func:`open_log_store` checks the header and that every
file has the size the header promises.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simenv.atomic import atomic_write
from simenv.config import check_range
from simenv.log import ImpressionLog, LogFormatError, json_default
from simenv.types import Columns

__all__ = [
    "STORE_FORMAT_VERSION",
    "LogStoreWriter",
    "write_log_store",
    "open_log_store",
    "iter_log_store",
    "concat_log_stores",
    "store_nbytes",
]

STORE_FORMAT_VERSION = 1
_FORMAT = "simenv.LogStore"
_HEADER = "header.json"
_CAND = "candidates.bin"
_CREQ = "candidate_request.bin"


# column name -> dtype, in the on-disk order of simenv.log
_COLUMNS: dict[str, np.dtype] = {c: a.dtype for c, a in ImpressionLog.empty().columns.items()}


def _col_file(name: str) -> str:
    return f"col.{name}.bin"


def _le(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


class LogStoreWriter:
    """Append :class:`ImpressionLog` chunks to a new log store at ``path``.

    Use as a context manager; the store appears at ``path`` only when :meth:`close` succeeds
    (an exception inside the ``with`` block removes the partial folder).

    Args:
        path: the store's folder (must not exist unless ``overwrite``).
        meta: the log's meta (JSON-able); :meth:`close` may replace it.
        overwrite: replace an existing store at ``path``.

    Example:
        >>> import tempfile
        >>> from simenv import ImpressionLog
        >>> d = tempfile.mkdtemp()
        >>> with LogStoreWriter(f"{d}/log", meta={"seed": 0}) as w:
        ...     w.append(ImpressionLog.empty())
        >>> len(open_log_store(f"{d}/log")), open_log_store(f"{d}/log").meta
        (0, {'seed': 0})
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ValueError(f"path {self.path} exists; pass overwrite=True to replace it")
        self.meta = dict(meta or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._files = {c: open(self._tmp / _col_file(c), "wb") for c in _COLUMNS}  # noqa: SIM115
        self._cand = None
        self._creq = None
        self.n_rows = 0
        self.n_candidates = 0
        self.width: int | None = None
        self._closed = False

    def append(self, log: ImpressionLog, request_offset: int = 0) -> None:
        """Write ``log``'s rows after the rows already written.

        Args:
            log: a chunk (columns of the ``simenv.log`` dtypes).
            request_offset: added to its request ids (and candidate requests) on the way.
        """
        if self._closed:
            raise ValueError("the writer is closed")
        check_range("request_offset", request_offset, 0, 2**62, integer=True)
        for c, dtype in _COLUMNS.items():
            a = log.columns[c]
            if c == Columns.REQUEST and request_offset:
                a = a + np.int64(request_offset)
            np.ascontiguousarray(a, dtype=_le(dtype)).tofile(self._files[c])
        self.n_rows += len(log)
        if log.candidates is not None:
            self.append_candidates(log.candidates, log.candidate_request, request_offset)

    def append_candidates(
        self, candidates: np.ndarray, candidate_request: np.ndarray, request_offset: int = 0
    ) -> None:
        """Write candidate sets (R, K) and their request ids (R,) after those already written."""
        candidates = np.asarray(candidates)
        if candidates.ndim != 2 or np.shape(candidate_request) != (candidates.shape[0],):
            raise ValueError(
                "candidates must be (R, K) and candidate_request (R,), got "
                f"{candidates.shape} and {np.shape(candidate_request)}"
            )
        if candidates.shape[0] == 0:
            return
        width = int(candidates.shape[1])
        if self.width is None:
            self.width = width
            self._cand = open(self._tmp / _CAND, "wb")  # noqa: SIM115
            self._creq = open(self._tmp / _CREQ, "wb")  # noqa: SIM115
        elif width != self.width:
            raise ValueError(
                f"candidate sets must keep one width in a store: got {width} after {self.width}"
            )
        np.ascontiguousarray(candidates, dtype="<i8").tofile(self._cand)
        (np.asarray(candidate_request, dtype=np.int64) + np.int64(request_offset)).astype(
            "<i8"
        ).tofile(self._creq)
        self.n_candidates += int(candidates.shape[0])

    def close(self, meta: dict[str, Any] | None = None) -> Path:
        """Finish the files, write the header and move the store into place; returns its path."""
        if self._closed:
            return self.path
        if meta is not None:
            self.meta = dict(meta)
        for f in [*self._files.values(), self._cand, self._creq]:
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        header = {
            "format": _FORMAT,
            "version": STORE_FORMAT_VERSION,
            "n_rows": self.n_rows,
            "columns": {c: _le(d).str for c, d in _COLUMNS.items()},
            "candidates": None
            if self.width is None
            else {"rows": self.n_candidates, "width": self.width},
            "meta": self.meta,
        }
        text = json.dumps(header, default=json_default, indent=1).encode()
        atomic_write(self._tmp / _HEADER, lambda f: f.write(text))
        if self.path.exists():  # overwrite: move the old store aside, then remove it
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old.", dir=self.path.parent))
            os.replace(self.path, old / "store")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written (the store does not appear)."""
        for f in [*self._files.values(), self._cand, self._creq]:
            if f is not None and not f.closed:
                f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> LogStoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_log_store(
    log: ImpressionLog, path: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write a whole in-memory log as a store (its meta included)."""
    with LogStoreWriter(path, log.meta, overwrite=overwrite) as w:
        w.append(log)
    return Path(path)


def _read_header(path: Path) -> dict[str, Any]:
    hp = path / _HEADER
    if not hp.is_file():
        raise LogFormatError(f"no log store at {path} (no {_HEADER})")
    try:
        header = json.loads(hp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LogFormatError(f"{hp} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise LogFormatError(f"{path} is not a simenv log store")
    if header.get("version") != STORE_FORMAT_VERSION:
        raise LogFormatError(
            f"{path} has log store version {header.get('version')}, this simenv reads "
            f"version {STORE_FORMAT_VERSION}"
        )
    n = header.get("n_rows")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LogFormatError(f"{path}: the header's n_rows is not a row count: {n!r}")
    return header


def _check_size(path: Path, need: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LogFormatError(f"{path} is missing") from e
    if size != need:
        raise LogFormatError(f"{path} has {size} bytes, the header promises {need}")


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
    need = int(np.prod(shape)) * dtype.itemsize
    _check_size(path, need)
    if need == 0:
        return np.zeros(shape, dtype=dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)


def open_log_store(path: str | os.PathLike[str], mmap: bool = True) -> ImpressionLog:
    """Open a log store as an :class:`ImpressionLog`.

    Args:
        path: the store's folder.
        mmap: map the columns read-only (default; nothing is read until used) or read them into
            memory.

    Returns:
        The log; with ``mmap`` its columns are read-only views of the files.

    Raises:
        LogFormatError: if the folder is not a complete store of this version.
    """
    path = Path(path)
    header = _read_header(path)
    n = header["n_rows"]
    cols = {c: _map(path / _col_file(c), _le(d), (n,), mmap) for c, d in _COLUMNS.items()}
    cand = creq = None
    spec = header.get("candidates")
    if spec is not None:
        r, k = int(spec["rows"]), int(spec["width"])
        cand = _map(path / _CAND, np.dtype("<i8"), (r, k), mmap)
        creq = _map(path / _CREQ, np.dtype("<i8"), (r,), mmap)
    try:
        return ImpressionLog(cols, cand, creq, header.get("meta", {}))
    except ValueError as e:
        raise LogFormatError(f"{path}: {e}") from e


def iter_log_store(
    path: str | os.PathLike[str],
    rows_per_chunk: int = 4_000_000,
    columns: Sequence[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The store's rows as in-memory column chunks of at most ``rows_per_chunk`` rows.

    Chunks are read with plain file reads, not a memory map, so only the current chunk is
    resident (a scan of a 100M-row store holds one chunk, not the file's pages).

    Args:
        path: the store.
        rows_per_chunk: rows per chunk.
        columns: the columns to read (default: all).

    Yields:
        Dicts column name -> array of the chunk's rows (candidate sets are not read).
    """
    check_range("rows_per_chunk", rows_per_chunk, 1, 2**40, integer=True)
    path = Path(path)
    header = _read_header(path)
    n = header["n_rows"]
    names = list(_COLUMNS) if columns is None else list(columns)
    unknown = [c for c in names if c not in _COLUMNS]
    if unknown:
        raise ValueError(f"columns has unknown names {unknown}; allowed: {list(_COLUMNS)}")
    for c in names:  # sizes checked up front: a damaged store fails before the first chunk
        _check_size(path / _col_file(c), n * _COLUMNS[c].itemsize)
    files = {c: open(path / _col_file(c), "rb") for c in names}  # noqa: SIM115
    try:
        for s in range(0, n, rows_per_chunk):
            m = min(n, s + rows_per_chunk) - s
            yield {c: np.fromfile(files[c], dtype=_le(_COLUMNS[c]), count=m) for c in names}
    finally:
        for f in files.values():
            f.close()


def concat_log_stores(
    parts: Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    renumber_requests: bool = True,
    rows_per_chunk: int = 4_000_000,
    overwrite: bool = False,
) -> Path:
    """Write the rows of several stores after one another into a new store, chunk by chunk.

    Args:
        parts: stores, in order.
        path: the new store.
        meta: its meta.
        renumber_requests: offset each part's request ids by the requests of the parts before
            it (each part numbering its slates from 0, as a shard of ``collect_sharded`` does).
        rows_per_chunk: rows held in memory at a time.
        overwrite: replace an existing store at ``path``.

    Returns:
        The new store's path.
    """
    check_range("rows_per_chunk", rows_per_chunk, 1, 2**40, integer=True)
    with LogStoreWriter(path, meta, overwrite=overwrite) as w:
        offset = 0
        for part in parts:
            log = open_log_store(part)
            n = len(log)
            req = log.columns[Columns.REQUEST]
            for s in range(0, n, rows_per_chunk):
                e = min(n, s + rows_per_chunk)
                chunk = {c: a[s:e] for c, a in log.columns.items()}
                w.append(ImpressionLog(chunk), offset if renumber_requests else 0)
            if log.candidates is not None:
                w.append_candidates(
                    log.candidates, log.candidate_request, offset if renumber_requests else 0
                )
            if renumber_requests and n:
                offset += int(req.max()) + 1
    return Path(path)


def store_nbytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the store's files on disk."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
