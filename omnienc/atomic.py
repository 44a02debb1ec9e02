"""Atomic file writes: write a temporary sibling, fsync it, then ``os.replace`` it into place.

A reader sees either the old file or the complete new one, never a half-written one, even if the
writer is killed with SIGKILL mid-write. The leftover of a killed writer is a hidden
``.NAME.tmp-PID-HEX`` sibling that nothing reads; the next write of ``NAME`` removes those whose
process is gone (:func:`remove_stale_temps`), so concurrent writers never delete each other's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP = re.compile(r"\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(path: Path, tag: str = "tmp", suffix: str = "") -> Path:
    """A hidden sibling ``.NAME.TAG-PID-HEX[SUFFIX]`` of ``path`` for an atomic write or swap."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def remove_stale_temps(path: Path, tag: str = "tmp") -> list[Path]:
    """Delete ``path``'s hidden ``TAG`` siblings whose writing process no longer exists.

    Returns:
        The removed paths.
    """
    removed = []
    for cand in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
        m = _TEMP.match(cand.name[len(path.name) + 1 :])
        if m is None or pid_alive(int(m["pid"])):
            continue
        if cand.is_dir() and not cand.is_symlink():
            shutil.rmtree(cand, ignore_errors=True)
        else:
            cand.unlink(missing_ok=True)
        removed.append(cand)
    return removed


@contextmanager
def atomic_target(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Args:
        path: The final file.
        suffix: Ending for the temporary name, for writers that look at it (``".nii.gz"``).

    Yields:
        A hidden sibling path in the same folder (so the rename never crosses file systems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_sibling(path, suffix=suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the writer produced no file at {tmp}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
