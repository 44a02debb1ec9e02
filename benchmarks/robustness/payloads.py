"""Pickle payloads and tampered files: what the checkpoint attacks plant.

A pickle payload is an object whose ``__reduce__`` creates a marker file when unpickled
(:class:`PicklePayload`); :func:`payload_is_live` tells whether it ran. The helpers copy a
checkpoint folder and edit its config, replace a file, or poison a cached ``.npz``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class PicklePayload:
    """Unpickling this object creates ``marker``: what a malicious checkpoint could do instead.

    Args:
        marker: The file that unpickling creates.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def write_pickle_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-style ``torch.save`` dict whose ``state_dict`` is a :class:`PicklePayload`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": PicklePayload(marker), "global_step": 1, "epoch": 0}, path)
    return path


def pickle_bytes(marker: Path) -> bytes:
    """The bytes of :func:`write_pickle_checkpoint` (to hide in a file of another name)."""
    buf = io.BytesIO()
    torch.save({"state_dict": PicklePayload(marker)}, buf)
    return buf.getvalue()


def payload_is_live(work: Path) -> bool:
    """Whether unpickling a payload really creates its marker (so a refusal is not vacuous)."""
    marker = work / "live-marker"
    path = write_pickle_checkpoint(work / "live.pt", marker)
    torch.load(path, weights_only=False)  # the unsafe load every loader must avoid
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def poison_npz(path: Path, key: str, marker: Path) -> Path:
    """Replace array ``key`` of a real ``.npz`` by a pickled :class:`PicklePayload`, in place.

    The other arrays stay, so a loader gets past its key checks to the pickled one.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != key}
    arrays[key] = np.array([PicklePayload(marker)], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # object arrays are pickled on save
    path.write_bytes(buf.getvalue())
    return path


def _replace_file(folder: Path, entry: str, data: bytes, extra: str | None = None) -> None:
    """Overwrite a weights file and record its new sha256, as a careful attacker would."""
    config = json.loads((folder / "config.json").read_text())
    record = config["weights"] if extra is None else config["extra"][extra]
    (folder / record["file"]).write_bytes(data)
    record["sha256"] = _sha256(folder / record["file"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
