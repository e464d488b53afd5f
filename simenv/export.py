"""Export an :class:`~simenv.log.ImpressionLog` to files that other libraries read.

Two formats, so that RecBole, RecTools, pandas or one's own code can train on simulator data:

- **RecBole atomic files** (:func:`export_recbole`): tab-separated text with a typed header
  (``name:token``, ``name:token_seq``, ``name:float``), one file per entity:

  - ``NAME.inter``: one row per log row (every impression, or only the positives):
    ``user_id:token  item_id:token  timestamp:float  label:float  feedback:token
    session:float  session_step:float  request_id:token  position:float  watch:float
    reward:float  propensity:float``. ``timestamp`` is the simulator time in days,
    ``label`` is 1 for a click or like (RecBole's ``LABEL_FIELD``), ``feedback`` the
    :class:`~simenv.types.EventType` value (0 impression, 1 click, 2 like, 3 dislike).
  - ``NAME.item`` (with a catalog): ``item_id:token  title:token_seq`` (the title's token
    ids, padding dropped), one ``NAME:token`` column per categorical feature, and
    ``release_time:float``.
  - ``NAME.user``: ``user_id:token`` of every user in the log, plus any user columns given.
  - ``NAME.simenv.json``: what the atomic files cannot hold (the log's meta, the row count,
    the catalog's vocabulary size, title width and cardinalities), so that
    :func:`read_recbole` gives back exactly what was written. RecBole ignores it.

  To train RecBole on the clicks only, export with ``positives_only=True`` (or keep every
  impression and filter on ``label`` in RecBole's config).

- **A plain delimited table** (:func:`export_table`): CSV (``.csv``) or TSV (``.tsv``) with a
  header line naming the log's columns (``user, time, session, session_step, request,
  position, item, feedback, watch, reward, propensity``) plus ``label``; read it back with
  :func:`read_table`, or with ``pandas.read_csv``.

Numbers are written so that they read back bit for bit: integers in decimal, float64 in the
shortest text that parses back to the same double, float32 in the shortest text that parses
(through a double, as every CSV reader does) back to the same float32. NaN is ``nan``.
Files are written atomically (temp file in the same folder, then rename). Candidate sets
(``log.candidates``) are not exported.

:func:`parse_atomic` / :func:`read_atomic` read any RecBole atomic file (they also serve the
MovieLens loader of :mod:`retrieval.datasets`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simenv.atomic import atomic_write
from simenv.log import ImpressionLog, json_default
from simenv.types import Columns, EventType, ItemCatalog

__all__ = [
    "ATOMIC_TYPES",
    "AtomicTable",
    "ExportFormatError",
    "RecBoleExport",
    "export_recbole",
    "export_table",
    "format_numbers",
    "parse_atomic",
    "read_atomic",
    "read_recbole",
    "read_table",
    "write_atomic",
]

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
SIDECAR_FORMAT = "simenv.export"
SIDECAR_VERSION = 2  # 2: SHA-256 of every file (version 1 files are read without it)

# log column -> (atomic field name, atomic type) in the order of the .inter file
_INTER_FIELDS: dict[str, tuple[str, str]] = {
    Columns.USER: ("user_id", "token"),
    Columns.ITEM: ("item_id", "token"),
    Columns.TIME: ("timestamp", "float"),
    Columns.FEEDBACK: ("feedback", "token"),
    Columns.SESSION: ("session", "float"),
    "session_step": ("session_step", "float"),
    Columns.REQUEST: ("request_id", "token"),
    Columns.POSITION: ("position", "float"),
    Columns.WATCH: ("watch", "float"),
    Columns.REWARD: ("reward", "float"),
    Columns.PROPENSITY: ("propensity", "float"),
}
_LABEL = "label"


class ExportFormatError(ValueError):
    """An exported or atomic file is missing, truncated or not in the expected format."""


def _log_dtypes() -> dict[str, np.dtype]:
    """Column name -> dtype of an ImpressionLog, in its on-disk order."""
    return {c: a.dtype for c, a in ImpressionLog.empty().columns.items()}


# --------------------------------------------------------------------------- numbers as text


def format_numbers(values: np.ndarray) -> np.ndarray:
    """Text of each number that parses back to exactly the same value.

    Integers and booleans in decimal; float64 in numpy's shortest round-trip form; float32 in
    its shortest float32 form, except where parsing that text as a double and rounding to
    float32 would land on a neighbour (double rounding), where the double's exact text is
    written instead. NaN is ``nan``, infinities ``inf`` / ``-inf``.

    Args:
        values: a 1-D numeric array.

    Returns:
        A 1-D array of str.
    """
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {a.shape}")
    if a.dtype.kind == "b":
        return a.astype(np.int8).astype(str)
    if a.dtype.kind in "iu":
        return a.astype(str)
    if a.dtype == np.float32:
        text = a.astype(str)
        back = text.astype(np.float64).astype(np.float32)
        bad = (back != a) & ~(np.isnan(a) & np.isnan(back))
        if bad.any():
            text[bad] = a[bad].astype(np.float64).astype(str)
        return text
    if a.dtype.kind == "f":
        return a.astype(np.float64).astype(str)
    raise ValueError(f"values must be numeric, got dtype {a.dtype}")


def _parse_numbers(
    text: np.ndarray, dtype: np.dtype, what: str, source: str, first_line: int = 2
) -> np.ndarray:
    """Strings -> numbers of ``dtype``; a bad value raises ExportFormatError naming its line."""
    dtype = np.dtype(dtype)
    try:
        parsed = text.astype(np.int64) if dtype.kind in "iu" else text.astype(np.float64)
    except (ValueError, OverflowError):
        for i, s in enumerate(text.tolist()):
            try:
                int(s) if dtype.kind in "iu" else float(s)
            except (ValueError, OverflowError):
                raise ExportFormatError(
                    f"{source}: line {first_line + i}: {what} must be "
                    f"{'an integer' if dtype.kind in 'iu' else 'a number'}, got {s!r}"
                ) from None
        raise ExportFormatError(f"{source}: {what} has values out of range for int64") from None
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        out_of_range = (parsed < info.min) | (parsed > info.max)
        if out_of_range.any():
            i = int(np.argmax(out_of_range))
            raise ExportFormatError(
                f"{source}: line {first_line + i}: {what} = {text[i]} is outside the "
                f"range of {dtype} [{info.min}, {info.max}]"
            )
    return parsed.astype(dtype)


# --------------------------------------------------------------------------- atomic files


@dataclass(frozen=True, eq=False)
class AtomicTable:
    """The content of one RecBole atomic file.

    Attributes:
        names: field names, in file order.
        types: the atomic type of each field (one of :data:`ATOMIC_TYPES`).
        values: field name -> 1-D array of str, one entry per data line.
        source: where it was read from (for messages).
    """

    names: tuple[str, ...]
    types: tuple[str, ...]
    values: dict[str, np.ndarray]
    source: str = "<text>"

    def __len__(self) -> int:
        return int(self.values[self.names[0]].size) if self.names else 0

    def has(self, name: str) -> bool:
        """Whether the file has a field called ``name``."""
        return name in self.values

    def type_of(self, name: str) -> str:
        """The atomic type of field ``name``."""
        return self.types[self.names.index(self._need(name))]

    def text(self, name: str) -> np.ndarray:
        """The raw strings of field ``name`` (1-D array of str)."""
        return self.values[self._need(name)]

    def numbers(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        """Field ``name`` parsed as numbers of ``dtype``; a bad value names its line."""
        return _parse_numbers(self.text(name), np.dtype(dtype), f"field {name!r}", self.source)

    def sequences(self, name: str) -> list[list[str]]:
        """A ``token_seq`` / ``float_seq`` field split on spaces (empty text: empty list)."""
        return [s.split() for s in self.text(name).tolist()]

    def _need(self, name: str) -> str:
        if name not in self.values:
            raise ExportFormatError(
                f"{self.source} has no field {name!r}; its fields are {list(self.names)}"
            )
        return name


def parse_atomic(text: str, source: str = "<text>") -> AtomicTable:
    r"""Parse the text of a RecBole atomic file: a ``name:type`` header, then tab-separated rows.

    Args:
        text: the whole file (``\\n`` or ``\\r\\n`` line ends; a final newline is optional).
        source: where the text came from, for messages.

    Returns:
        An :class:`AtomicTable` with the raw strings of every field.

    Raises:
        ExportFormatError: for an empty file, a header field that is not ``name:type`` with
            a known type, a repeated field, or a line whose number of fields differs from
            the header's (the last line: "truncated?").
    """
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise ExportFormatError(f"{source} is empty: expected a header line of name:type fields")
    names: list[str] = []
    types: list[str] = []
    for field in lines[0].split("\t"):
        name, colon, typ = field.strip().rpartition(":")
        if not colon or not name or typ not in ATOMIC_TYPES:
            raise ExportFormatError(
                f"{source}: header field {field!r} is not name:type with type in {ATOMIC_TYPES}"
                " (is this a RecBole atomic file?)"
            )
        if name in names:
            raise ExportFormatError(f"{source}: header names field {name!r} twice")
        names.append(name)
        types.append(typ)
    rows = [line.split("\t") for line in lines[1:]]
    width = len(names)
    bad = [i for i, r in enumerate(rows) if len(r) != width]
    if bad:
        i = bad[0]
        hint = " (the file looks truncated)" if i == len(rows) - 1 else ""
        raise ExportFormatError(
            f"{source}: line {i + 2} has {len(rows[i])} tab-separated fields, the header has "
            f"{width}{hint}"
        )
    if rows:
        cells = np.array(rows, dtype=str)  # (R, F)
        values = {n: cells[:, j].copy() for j, n in enumerate(names)}
    else:
        values = {n: np.zeros(0, dtype=str) for n in names}
    return AtomicTable(tuple(names), tuple(types), values, source)


def read_atomic(path: str | os.PathLike[str]) -> AtomicTable:
    """Read a RecBole atomic file (UTF-8); see :func:`parse_atomic`.

    Raises:
        ExportFormatError: if the file is missing, not UTF-8 text, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"no atomic file at {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportFormatError(f"{path} is not UTF-8 text: {e}") from e
    return parse_atomic(text, str(path))


def _atomic_write_text(path: Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def _join_rows(columns: Sequence[np.ndarray], sep: str) -> str:
    """Lines of ``sep``-joined cells (every column a 1-D str array of one length)."""
    if not columns or columns[0].size == 0:
        return ""
    return "".join(sep.join(row) + "\n" for row in zip(*(c.tolist() for c in columns), strict=True))


def write_atomic(
    path: str | os.PathLike[str], fields: Sequence[tuple[str, str, np.ndarray]]
) -> Path:
    """Write a RecBole atomic file atomically.

    Args:
        path: destination file.
        fields: ``(name, type, values)`` per column; numeric values are formatted with
            :func:`format_numbers`, str values written as they are (they must not contain
            tabs or newlines).

    Returns:
        The path written.
    """
    if not fields:
        raise ValueError("fields must name at least one column")
    cols = []
    n = None
    for name, typ, values in fields:
        if typ not in ATOMIC_TYPES:
            raise ValueError(f"field {name!r}: type must be one of {ATOMIC_TYPES}, got {typ!r}")
        if not name or any(c in name for c in ":\t\n"):
            raise ValueError(f"field name {name!r} must be non-empty without ':', tab or newline")
        v = np.asarray(values)
        text = v.astype(str) if v.dtype.kind in "US" else format_numbers(v)
        if n is None:
            n = text.size
        elif text.size != n:
            raise ValueError(f"field {name!r} has {text.size} values, expected {n}")
        if (
            v.dtype.kind in "US"
            and text.size
            and (np.char.find(text, "\t").max() >= 0 or np.char.find(text, "\n").max() >= 0)
        ):
            raise ValueError(f"field {name!r} has values with a tab or newline")
        cols.append(text)
    header = "\t".join(f"{name}:{typ}" for name, typ, _ in fields) + "\n"
    return _atomic_write_text(Path(path), header + _join_rows(cols, "\t"))


# --------------------------------------------------------------------------- RecBole export


@dataclass(frozen=True, eq=False)
class RecBoleExport:
    """What :func:`read_recbole` reads back.

    Attributes:
        log: the exported rows (all of them, or only the positives).
        catalog: the public catalog, if one was exported.
        users: int64 ``(U,)`` user ids of the ``.user`` file.
        user_columns: the extra ``.user`` columns, by name.
    """

    log: ImpressionLog
    catalog: ItemCatalog | None
    users: np.ndarray
    user_columns: dict[str, np.ndarray]


def export_recbole(
    log: ImpressionLog,
    folder: str | os.PathLike[str],
    name: str = "simenv",
    catalog: ItemCatalog | None = None,
    user_columns: Mapping[str, np.ndarray] | None = None,
    positives_only: bool = False,
) -> dict[str, Path]:
    """Write ``log`` (and the catalog) as RecBole atomic files ``folder/NAME.{inter,item,user}``.

    Args:
        log: the impression log.
        folder: destination folder (created if missing); RecBole's ``data_path`` is its parent
            and ``dataset`` is ``name`` when ``folder`` ends with ``name``.
        name: dataset name (file stem): letters, digits, ``-`` and ``_``.
        catalog: the public item catalog; gives ``NAME.item`` (item ids must be below its size).
        user_columns: extra per-user columns for ``NAME.user``: name -> ``(n,)`` numeric array
            indexed by user id (ints are written as tokens, floats as floats).
        positives_only: write only clicks and likes (what a sequential model trains on).

    Returns:
        The written paths by kind: ``"inter"``, ``"user"``, ``"item"`` (with a catalog) and
        ``"meta"`` (the sidecar).

    Raises:
        ValueError: for a bad name, user columns that do not cover the log's users, or item
            ids outside the catalog.
    """
    if not isinstance(log, ImpressionLog):
        raise ValueError(f"log must be an ImpressionLog, got {type(log).__name__}")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be letters, digits, '-' or '_', got {name!r}")
    folder = Path(folder)
    rows = log.positives() if positives_only else log
    c = rows.columns
    users = np.unique(c[Columns.USER])
    if catalog is not None and len(rows) and int(c[Columns.ITEM].max()) >= catalog.n_items:
        raise ValueError(
            f"log has item id {int(c[Columns.ITEM].max())} but catalog has {catalog.n_items} items"
        )
    fb = c[Columns.FEEDBACK]
    label = ((fb == EventType.CLICK) | (fb == EventType.LIKE)).astype(np.float32)
    inter_fields = [(f, t, c[col]) for col, (f, t) in _INTER_FIELDS.items()]
    inter_fields.insert(3, (_LABEL, "float", label))
    out = {"inter": write_atomic(folder / f"{name}.inter", inter_fields)}

    user_fields: list[tuple[str, str, np.ndarray]] = [("user_id", "token", users)]
    extra_dtypes: dict[str, str] = {}
    for col, values in (user_columns or {}).items():
        v = np.asarray(values)
        if v.ndim != 1 or v.dtype.kind not in "biuf":
            raise ValueError(f"user_columns[{col!r}] must be a 1-D numeric array, got {v.dtype}")
        if col == "user_id":
            raise ValueError("user_columns must not be called 'user_id'")
        if users.size and int(users.max()) >= v.size:
            raise ValueError(
                f"user_columns[{col!r}] has {v.size} entries but the log has user id "
                f"{int(users.max())}: index it by user id"
            )
        typ = "float" if v.dtype.kind == "f" else "token"
        user_fields.append((col, typ, v[users]))
        extra_dtypes[col] = v.dtype.str
    out["user"] = write_atomic(folder / f"{name}.user", user_fields)

    cat_info = None
    if catalog is not None:
        tokens = np.asarray(catalog.title_tokens)
        titles = np.array([" ".join(map(str, row[row > 0].tolist())) for row in tokens], dtype=str)
        item_fields = [
            ("item_id", "token", np.arange(catalog.n_items)),
            ("title", "token_seq", titles),
        ]
        for j, cname in enumerate(catalog.categorical_names):
            item_fields.append((cname, "token", np.asarray(catalog.categorical)[:, j]))
        item_fields.append(("release_time", "float", np.asarray(catalog.release_time)))
        out["item"] = write_atomic(folder / f"{name}.item", item_fields)
        cat_info = {
            "vocab_size": int(catalog.vocab_size),
            "title_width": int(tokens.shape[1]),
            "title_dtype": tokens.dtype.str,
            "categorical_names": list(catalog.categorical_names),
            "categorical_cardinalities": [int(x) for x in catalog.categorical_cardinalities],
            "categorical_dtype": np.asarray(catalog.categorical).dtype.str,
            "release_dtype": np.asarray(catalog.release_time).dtype.str,
        }
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "sha256": {kind: _sha256(p) for kind, p in out.items()},
        "n_rows": len(rows),
        "positives_only": bool(positives_only),
        "meta": rows.meta,
        "catalog": cat_info,
        "user_columns": extra_dtypes,
    }
    sidecar["sha256"]["sidecar"] = _sidecar_digest(
        json.loads(json.dumps(sidecar, default=json_default))
    )
    text = json.dumps(sidecar, indent=1, default=json_default) + "\n"
    out["meta"] = _atomic_write_text(folder / f"{name}.simenv.json", text)
    return out


def read_recbole(folder: str | os.PathLike[str], name: str = "simenv") -> RecBoleExport:
    """Read back files written by :func:`export_recbole` (the exact log, catalog and users).

    Every value is checked (the log's columns as :class:`ImpressionLog` checks them, title
    tokens below the vocabulary size, categorical values below their cardinalities, finite
    release times), and every file against the SHA-256 the export recorded in the sidecar,
    so a damaged or edited file is an error, never a silently different log.

    Raises:
        ExportFormatError: when a file is missing, truncated (fewer rows than the sidecar
            promises), not in the expected format, holds an invalid value, or differs from
            what the export wrote.
    """
    folder = Path(folder)
    meta_path = folder / f"{name}.simenv.json"
    if not meta_path.is_file():
        raise ExportFormatError(f"no {meta_path.name} in {folder}: not written by export_recbole")
    try:
        side = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ExportFormatError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise ExportFormatError(f"{meta_path} is not a simenv export sidecar")
    if side.get("version") not in (1, SIDECAR_VERSION):
        raise ExportFormatError(
            f"{meta_path} has version {side.get('version')}, this simenv reads 1 and "
            f"{SIDECAR_VERSION}"
        )
    digests = side.get("sha256") if side.get("version") >= 2 else {}
    if not isinstance(digests, dict):
        raise ExportFormatError(f"{meta_path}: 'sha256' must map file kinds to digests")
    if digests and digests.get("sidecar") != _sidecar_digest(side):
        raise ExportFormatError(
            f"{meta_path} was changed after the export (its SHA-256 does not match)"
        )
    try:
        return _read_recbole(folder, name, side, digests)
    except ExportFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a sidecar field of the wrong type
        raise ExportFormatError(f"{meta_path}: malformed sidecar ({type(e).__name__}: {e})") from e


def _read_recbole(
    folder: Path, name: str, side: dict[str, Any], digests: dict[str, Any]
) -> RecBoleExport:
    """The body of :func:`read_recbole` once the sidecar is known to be a sidecar."""
    inter = read_atomic(folder / f"{name}.inter")
    if len(inter) != side.get("n_rows"):
        raise ExportFormatError(
            f"{inter.source} has {len(inter)} rows, the export wrote {side.get('n_rows')}"
            " (truncated?)"
        )
    dtypes = _log_dtypes()
    cols = {col: inter.numbers(field, dtypes[col]) for col, (field, _t) in _INTER_FIELDS.items()}
    meta = side.get("meta") or {}
    try:
        log = ImpressionLog(cols, meta=meta)
    except ValueError as e:
        raise ExportFormatError(f"{inter.source}: {e}") from e
    user_tab = read_atomic(folder / f"{name}.user")
    users = user_tab.numbers("user_id", np.int64)
    user_columns = {}
    for k, dt in (side.get("user_columns") or {}).items():
        dtype = np.dtype(dt)
        if dtype.kind not in "biuf":
            raise ExportFormatError(f"{user_tab.source}: user column {k!r} has dtype {dtype}")
        user_columns[k] = user_tab.numbers(k, dtype)
    catalog = None
    info = side.get("catalog")
    if info is not None:
        item = read_atomic(folder / f"{name}.item")
        catalog = _read_catalog(item, info)
    for kind, path in (
        ("inter", inter.source),
        ("user", user_tab.source),
        ("item", None if catalog is None else folder / f"{name}.item"),
    ):
        want = digests.get(kind)
        if path is not None and want is not None and _sha256(Path(path)) != want:
            raise ExportFormatError(
                f"{path} differs from the file export_recbole wrote (SHA-256 mismatch): "
                "damaged or edited"
            )
    return RecBoleExport(log, catalog, users, user_columns)


def _read_catalog(item: AtomicTable, info: dict[str, Any]) -> ItemCatalog:
    """The ItemCatalog of a ``NAME.item`` file, every value checked."""
    ids = item.numbers("item_id", np.int64)
    if not np.array_equal(ids, np.arange(ids.size)):
        raise ExportFormatError(f"{item.source}: item_id must be 0..N-1 in order")
    title_dtype, cat_dtype = np.dtype(info["title_dtype"]), np.dtype(info["categorical_dtype"])
    release_dtype = np.dtype(info["release_dtype"])
    if title_dtype.kind not in "iu" or cat_dtype.kind not in "iu" or release_dtype.kind != "f":
        raise ExportFormatError(
            f"{item.source}: the sidecar names dtypes {title_dtype}, {cat_dtype}, "
            f"{release_dtype}; expected integer titles and features and float release times"
        )
    vocab_size, width = int(info["vocab_size"]), int(info["title_width"])
    names = tuple(str(n) for n in info["categorical_names"])
    cards = tuple(int(x) for x in info["categorical_cardinalities"])
    if len(cards) != len(names) or vocab_size < 1 or width < 0 or min(cards, default=1) < 1:
        raise ExportFormatError(f"{item.source}: the sidecar's catalog sizes do not fit")
    seqs = item.sequences("title")
    if any(len(s) > width for s in seqs):
        raise ExportFormatError(f"{item.source}: a title has more than {width} tokens")
    flat = np.array([t for s in seqs for t in s], dtype=str)
    flat_ids = _parse_numbers(flat, np.dtype(np.int64), "field 'title'", item.source)
    _check_ids(item.source, "title", flat_ids, 1, vocab_size)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    title = np.zeros((ids.size, width), dtype=title_dtype)
    rows = np.repeat(np.arange(ids.size), lengths)
    cols_ = np.arange(flat_ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    title[rows, cols_] = flat_ids
    feats = []
    for n, card in zip(names, cards, strict=True):
        v = item.numbers(n, cat_dtype)
        _check_ids(item.source, n, v, 0, card)
        feats.append(v)
    categorical = np.stack(feats, axis=1) if names else np.zeros((ids.size, 0), dtype=cat_dtype)
    release = item.numbers("release_time", release_dtype)
    if not np.isfinite(release).all():
        i = int(np.argmax(~np.isfinite(release)))
        raise ExportFormatError(
            f"{item.source}: line {i + 2}: release_time must be finite, got {release[i]}"
        )
    return ItemCatalog(
        title_tokens=title,
        vocab_size=vocab_size,
        categorical=categorical,
        categorical_names=names,
        categorical_cardinalities=cards,
        release_time=release,
    )


def _check_ids(source: str, what: str, v: np.ndarray, low: int, high: int) -> None:
    bad = (v < low) | (v >= high)
    if bad.any():
        i = int(np.argmax(bad))
        raise ExportFormatError(f"{source}: field {what!r} must lie in [{low}, {high}), got {v[i]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar_digest(side: dict[str, Any]) -> str:
    """SHA-256 of the sidecar's content without its own digest (canonical JSON)."""
    rest = {k: v for k, v in side.items() if k != "sha256"}
    files = {k: v for k, v in (side.get("sha256") or {}).items() if k != "sidecar"}
    text = json.dumps({**rest, "sha256": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- plain table


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        if sep not in (",", "\t"):
            raise ValueError(f"sep must be ',' or '\\t', got {sep!r}")
        return sep
    if path.suffix.lower() == ".csv":
        return ","
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    raise ValueError(
        f"cannot tell the separator from {path.name!r}: name it .csv or .tsv, or pass sep"
    )


def export_table(log: ImpressionLog, path: str | os.PathLike[str], sep: str | None = None) -> Path:
    r"""Write every row of ``log`` to a CSV or TSV file with a header line.

    Columns: the log's columns in their on-disk order, then ``label`` (1 for a click or
    like, else 0). ``feedback`` holds the :class:`~simenv.types.EventType` value.

    Args:
        log: the impression log.
        path: destination (``.csv``: comma, ``.tsv``: tab, unless ``sep`` says).
        sep: ``","`` or ``"\\t"``.

    Returns:
        The path written.
    """
    if not isinstance(log, ImpressionLog):
        raise ValueError(f"log must be an ImpressionLog, got {type(log).__name__}")
    path = Path(path)
    s = _separator(path, sep)
    names = list(log.columns)
    fb = log[Columns.FEEDBACK]
    label = ((fb == EventType.CLICK) | (fb == EventType.LIKE)).astype(np.int8)
    cols = [format_numbers(log[n]) for n in names] + [format_numbers(label)]
    header = s.join([*names, _LABEL]) + "\n"
    return _atomic_write_text(path, header + _join_rows(cols, s))


def read_table(path: str | os.PathLike[str], sep: str | None = None) -> ImpressionLog:
    """Read a table written by :func:`export_table` back into an :class:`ImpressionLog`.

    Columns may come in any order; extra columns (such as ``label``) are ignored.

    Raises:
        ExportFormatError: if the file is missing, lacks a log column, has a line with the
            wrong number of fields (e.g. truncated) or a value that is not a number.
    """
    path = Path(path)
    s = _separator(path, sep)
    if not path.is_file():
        raise ExportFormatError(f"no table at {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportFormatError(f"{path} is not UTF-8 text: {e}") from e
    if not text:
        raise ExportFormatError(f"{path} is empty: expected a header line")
    if not text.endswith("\n"):  # export_table ends every line, the last one too
        raise ExportFormatError(f"{path} does not end with a newline: the file looks truncated")
    lines = text.replace("\r\n", "\n").split("\n")
    lines.pop()
    header = lines[0].split(s)
    dtypes = _log_dtypes()
    missing = [c for c in dtypes if c not in header]
    if missing:
        raise ExportFormatError(f"{path}: header lacks columns {missing}; it has {header}")
    rows = [line.split(s) for line in lines[1:]]
    bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        i = bad[0]
        hint = " (the file looks truncated)" if i == len(rows) - 1 else ""
        raise ExportFormatError(
            f"{path}: line {i + 2} has {len(rows[i])} fields, the header has {len(header)}{hint}"
        )
    cells = np.array(rows, dtype=str) if rows else np.zeros((0, len(header)), dtype=str)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ExportFormatError(f"{path}: header names columns {repeated} more than once")
    cols = {
        c: _parse_numbers(cells[:, header.index(c)], dt, f"column {c!r}", str(path))
        for c, dt in dtypes.items()
    }
    try:
        return ImpressionLog(cols)
    except ValueError as e:
        raise ExportFormatError(f"{path}: {e}") from e
