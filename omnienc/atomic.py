"""Atomic file writes: write a temporary sibling, fsync it, then ``os.replace`` it into place.

A reader sees either the old file or the complete new one, never a half-written one, even if the
writer is killed with SIGKILL mid-write. The leftover of a killed writer is a hidden
``.NAME.tmp-HOST-PID-HEX`` sibling that nothing reads; the next write of ``NAME`` removes the
stale ones (:func:`remove_stale_temps`), so concurrent writers never delete each other's.

Several hosts on one shared file system: every temporary names its writer's host
(:func:`hostname`) as well as its process id, and a temporary is stale when its host is this one
and its process is gone, or, for another host's (whose processes cannot be seen from here), when
it has not been modified for :data:`FOREIGN_TEMP_MAX_AGE_S` (24 hours; no single atomic write
takes that long). Temporaries named the older way, ``.NAME.tmp-PID-HEX``, count as this host's.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOSTNAME_ENV = "OMNIENC_HOSTNAME"
"""Environment variable that overrides :func:`hostname` (tests that play two hosts; containers
whose host names repeat across machines)."""

FOREIGN_TEMP_MAX_AGE_S = 24 * 3600.0
"""Age (seconds since the last modification) after which another host's temporary is stale."""

_HOST_CHARS = re.compile(r"[^A-Za-z0-9.]")
_HOST_MAX = 40  # characters of a host name kept in a file name; longer ones end with a digest
_TEMP = re.compile(r"\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9._]+)-)?(?P<pid>\d+)-[0-9a-f]{8}(?:\..*)?")


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


def hostname() -> str:
    """This host's name as it appears in temporary file names.

    ``$OMNIENC_HOSTNAME`` when set, else ``socket.gethostname()``; characters other than
    letters, digits and ``.`` become ``_`` (so that ``-`` separates the fields of a temporary's
    name), and a name longer than 40 characters is cut to 31 plus ``_`` and an 8-digit digest.
    """
    raw = os.environ.get(HOSTNAME_ENV) or socket.gethostname() or "localhost"
    name = _HOST_CHARS.sub("_", raw)
    if len(name) > _HOST_MAX:
        name = name[:31] + "_" + hashlib.blake2b(raw.encode(), digest_size=4).hexdigest()
    return name


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
    """A hidden sibling ``.NAME.TAG-HOST-PID-HEX[SUFFIX]`` of ``path``, for an atomic write."""
    token = f"{hostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.parent / f".{path.name}.{tag}-{token}{suffix}"


def is_stale_temp(
    path: Path, target: Path, max_foreign_age: float = FOREIGN_TEMP_MAX_AGE_S
) -> bool:
    """Whether ``path``, a hidden temporary sibling of ``target``, was left by a dead writer.

    Args:
        path: A candidate ``.NAME.TAG-HOST-PID-HEX`` (or older ``.NAME.TAG-PID-HEX``) sibling.
        target: The file or folder it is a temporary of (``NAME``).
        max_foreign_age: Seconds without modification after which a temporary of another host
            is stale.

    Returns:
        ``True`` when it is this host's and its process is gone, or another host's and older
        than ``max_foreign_age``; ``False`` otherwise, and for names of another pattern.
    """
    prefix = f".{target.name}"
    if not path.name.startswith(prefix):
        return False
    m = _TEMP.fullmatch(path.name[len(prefix) :])
    if m is None:
        return False
    if m["host"] is None or m["host"] == hostname():
        return not pid_alive(int(m["pid"]))
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > max_foreign_age


def remove_stale_temps(path: Path, tag: str = "tmp") -> list[Path]:
    """Delete ``path``'s hidden ``TAG`` siblings left by dead writers (:func:`is_stale_temp`).

    Returns:
        The removed paths.
    """
    removed = []
    for cand in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
        if not is_stale_temp(cand, path):
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
