"""Writing a checkpoint folder atomically: a temporary folder, fsync, one swap, recovery.

:func:`write_checkpoint_folder` is the one write that :func:`omnienc.checkpoint.save_encoder`
and ``omnienc export`` share: it refuses to replace a folder that is not a checkpoint, writes
into a temporary sibling, syncs every file (:func:`write_text_synced`), swaps it in with renames,
and cleans up. :func:`recover_interrupted_save` finishes or rolls back a swap that a kill
interrupted, so a reader finds either the old checkpoint or the new one.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from omnienc.atomic import fsync_dir, is_stale_temp, remove_stale_temps, temp_sibling
from omnienc.errors import CheckpointError

logger = logging.getLogger("omnienc")

FORMAT = "omnienc-encoder"
CONFIG_FILE = "config.json"


def write_text_synced(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint_folder(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write a checkpoint-like folder atomically: ``fill`` writes its files into a temporary.

    ``path`` must be replaceable (absent, empty, or an omnienc checkpoint); an interrupted
    earlier save is recovered first. ``fill(tmp)`` writes (and fsyncs) the files into a fresh
    sibling folder, which is then fsynced and swapped in for ``path``; on any failure the
    temporary is removed and ``path`` is untouched. Used by :func:`save_encoder` and
    :func:`omnienc.export.export_checkpoint`.

    Returns:
        ``path``.
    """
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(path)
    # os.mkdir (unlike tempfile.mkdtemp's 0700) gives the folder the permissions of the umask.
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_dir(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but a checkpoint folder or an empty folder."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(path, "exists and is not a folder; refusing to replace it")
    if not any(path.iterdir()):
        return
    try:
        is_checkpoint = json.loads((path / CONFIG_FILE).read_text("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_checkpoint = False
    if not is_checkpoint:
        raise CheckpointError(
            path, "exists and is not an omnienc encoder checkpoint; refusing to overwrite it"
        )


def recover_interrupted_save(path: str | Path) -> Path | None:
    """Repair what a save killed mid-way left beside ``path``; return a restored folder.

    A save writes ``.NAME.tmp-HOST-PID-HEX``, moves the old folder aside to ``.NAME.old-...``
    and renames the new one in. Killed between the two renames, ``path`` is missing and the aside
    holds the previous complete checkpoint: it is renamed back. Temporaries and asides of writers
    that are gone are deleted; those of a live writer, or of another host that wrote in the last
    24 hours (:func:`omnienc.atomic.is_stale_temp`), are left alone.
    """
    path = Path(path)
    remove_stale_temps(path)
    restored = None
    if not path.exists():
        asides = [
            p
            for p in path.parent.glob(f".{glob.escape(path.name)}.old-*")
            if (p / CONFIG_FILE).is_file() and is_stale_temp(p, path)
        ]
        if asides:
            newest = max(asides, key=lambda p: p.stat().st_mtime)
            os.replace(newest, path)
            fsync_dir(path.parent)
            logger.warning("%s: restored the checkpoint an interrupted save had moved aside", path)
            restored = path
    if path.exists():
        remove_stale_temps(path, tag="old")
    return restored


def _swap_in(tmp: Path, path: Path, attempts: int = 20) -> None:
    """Rename ``tmp`` to ``path``, moving an existing ``path`` aside until the rename is done.

    Another process (on this host or another) may save the same checkpoint at the same time and
    rename its folder in between our two renames; the rename then fails with ``ENOTEMPTY`` and
    is retried after moving that folder aside too, so the last writer wins and no save fails.
    """
    asides: list[Path] = []
    for _ in range(attempts):
        if path.exists():
            aside = temp_sibling(path, tag="old")
            try:
                os.replace(path, aside)
                asides.append(aside)
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.replace(tmp, path)
            break
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                continue  # a concurrent save renamed its folder in: move that aside, retry
            if asides and not path.exists():
                os.replace(asides.pop(), path)
            raise
    else:
        raise CheckpointError(path, f"{attempts} concurrent saves kept replacing it; try again")
    fsync_dir(path.parent)
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
