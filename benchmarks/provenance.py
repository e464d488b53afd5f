"""Provenance of a benchmark run: command, package versions, git commit, machine, time.

Everything here is recorded in results.json so that a figure can be traced back to the
code and the command that produced it. Nothing identifies the host (no hostname, no user).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Provenance", "collect_provenance", "package_versions", "git_info", "machine_info"]

# Distribution names whose versions every report records (key shown in the report).
PACKAGES: dict[str, str] = {
    "numpy": "numpy",
    "torch": "torch",
    "gymnasium": "gymnasium",
    "faiss": "faiss-cpu",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
    """Versions of python and the project's dependencies, read without importing them.

    Returns:
        ``{"python": "3.11.2", "numpy": "2.1.0", ...}``; ``"not installed"`` for a missing one.
    """
    versions = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = "not installed"
    return versions


def git_info(repo: Path | str = REPO_ROOT) -> dict[str, Any]:
    """The git commit of ``repo`` and whether tracked files differ from it.

    Args:
        repo: a directory inside the working tree (defaults to this project's root).

    Returns:
        ``{"commit": sha, "dirty": bool}``, or ``{"commit": "unknown", "dirty": None}``
        outside git, without git, or if git fails.
    """

    def _git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip()

    try:
        commit = _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    try:
        dirty: bool | None = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    """Hostname-free description of the machine.

    Returns:
        CPU count, the CPUs this process may use, platform string, architecture and
        python implementation.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
    }


@dataclass(frozen=True)
class Provenance:
    """Where, when and how a run happened (the volatile part of a report).

    Attributes:
        command: the canonical command that reproduces this experiment's numbers.
        argv: ``sys.argv`` as the process received it.
        started_at: start time, ISO 8601 in UTC.
        git: ``{"commit": ..., "dirty": ...}`` from :func:`git_info`.
        versions: from :func:`package_versions`.
        machine: from :func:`machine_info`.
        threads: the thread count applied to torch / faiss (``None``: library defaults).
        device: the torch device the run asked for (``--device``).
    """

    command: str
    argv: tuple[str, ...]
    started_at: str
    git: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    device: str = "cpu"


def collect_provenance(
    command: str,
    argv: list[str] | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> Provenance:
    """Gather provenance now (start time, git state, versions, machine).

    Args:
        command: the canonical command line reproducing the run.
        argv: the raw argument vector (defaults to ``sys.argv``).
        threads: the thread count the run applies (``None``: library defaults).
        device: the torch device the run asked for.

    Returns:
        A :class:`Provenance`.
    """
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return Provenance(
        command=command,
        argv=tuple(sys.argv if argv is None else argv),
        started_at=started.isoformat().replace("+00:00", "Z"),
        git=git_info(),
        versions=package_versions(),
        machine=machine_info(),
        threads=threads,
        device=device,
    )
