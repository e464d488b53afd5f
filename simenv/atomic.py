"""Atomic file writes: saved data is never lost or half-written.

Every writer of the project (impression logs, exports, checkpoints, reports) goes through
:func:`atomic_write`: the bytes go to a temporary file in the target's folder, are flushed and
fsync'ed, and the temporary file is renamed over the target with ``os.replace`` (atomic on
POSIX). If anything fails, the temporary file is removed and an existing target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically.

    Args:
        path: the target file (its folder is created if needed).
        write: called with a binary file object opened on the temporary file.

    Returns:
        The target path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
