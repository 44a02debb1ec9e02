"""Exported encoder checkpoints: a folder of safetensors weights and one JSON file.

A checkpoint folder holds::

    config.json         format, family, arch, encoder config, embed_dim, preprocessing, meta,
                        and the sha256 of every weights file
    model.safetensors   the encoder's state dict
    NAME.safetensors    optional extra modules saved beside it (e.g. the in-context head)

Loading reads JSON and safetensors only and never unpickles, so a checkpoint from anywhere is
safe to open. Every problem is a :class:`~omnienc.errors.CheckpointError` naming the folder and
what is wrong. Saving is atomic: the folder is written under a temporary name beside the target,
fsync'd, then renamed into place; an existing checkpoint is moved aside first and deleted only
once the new one is in place, so a crash leaves either the old or the new checkpoint (the old one,
at worst, under its ``.NAME.old-*`` name), never a half-written one.

The atomic folder write itself is :mod:`omnienc.checkpoint_folder`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from omnienc.checkpoint_folder import (
    CONFIG_FILE,
    FORMAT,
    write_checkpoint_folder,
    write_text_synced,
)
from omnienc.encoders import (
    ENCODERS,
    FAMILIES,
    Encoder,
    arch_family,
    arch_name,
    encoder_from_config,
)
from omnienc.errors import CheckpointError
from omnienc.hub import resolve_checkpoint
from omnienc.preprocessing import Preprocessing

logger = logging.getLogger("omnienc")
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Suffixes of pickle-based checkpoints that load_encoder refuses with a pointed message.
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_LIST_LIMIT = 12  # keys named per kind of state-dict mismatch
_REQUIRED_KEYS = ("family", "arch", "config", "embed_dim", "preprocessing", "weights")


def save_encoder(
    encoder: Encoder,
    path: str | Path,
    preprocessing: Preprocessing,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write an encoder checkpoint folder atomically.

    Args:
        encoder: The encoder to export.
        path: The checkpoint folder. If it exists it must be an omnienc checkpoint (or empty);
            it is replaced.
        preprocessing: The preprocessing the encoder was trained with.
        meta: JSON-serialisable facts to record, e.g. ``{"pretext": "mass+contrastive",
            "step": 1000}``.
        extra: Further modules to store beside the encoder, by name (letters, digits, ``_``,
            ``-``); read them back with :func:`load_extra`.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: ``path`` exists and is a file or a folder that is not a checkpoint.
        ValueError: ``meta`` is not JSON-serialisable or an extra name is invalid.
    """
    path = Path(path)
    meta = dict(meta or {})
    extra = dict(extra or {})
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from e
    for name in extra:
        if not _EXTRA_NAME.match(name) or name == "model":
            raise ValueError(
                f"extra module name {name!r} must match {_EXTRA_NAME.pattern} and not be 'model'"
            )

    def fill(tmp: Path) -> None:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": encoder.family,
            "arch": arch_name(encoder),
            "config": encoder.config.to_dict(),
            "embed_dim": encoder.embed_dim,
            "preprocessing": preprocessing.to_dict(),
            "meta": meta,
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": _write_weights(encoder, tmp / WEIGHTS_FILE),
            },
            "extra": {
                name: {
                    "file": f"{name}.safetensors",
                    "sha256": _write_weights(module, tmp / f"{name}.safetensors"),
                }
                for name, module in extra.items()
            },
        }
        write_text_synced(tmp / CONFIG_FILE, json.dumps(config, indent=2, allow_nan=False) + "\n")

    return write_checkpoint_folder(path, fill)


def load_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's ``config.json``.

    Args:
        path: The checkpoint folder, or a Hub id ``hf-hub:ORG/NAME[@REV]`` (:mod:`omnienc.hub`).

    Returns:
        The parsed ``config.json``.

    Raises:
        CheckpointError: The folder or file is missing, not JSON, or not a supported format.
    """
    path = resolve_checkpoint(path)
    if not path.exists():
        asides = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"))
        hint = (
            f"; {asides[-1].name} beside it holds the checkpoint an interrupted save moved "
            "aside (the next save restores it, or rename it back)"
            if asides
            else ""
        )
        raise CheckpointError(path, "checkpoint folder does not exist" + hint)
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            problem = (
                f"is a {path.suffix} file, not an omnienc encoder folder; load_encoder reads "
                "only a folder of safetensors + JSON (config.json, model.safetensors) and never "
                "unpickles files. Export the encoder with omnienc.save_encoder"
            )
        else:
            problem = (
                "is a file, not an omnienc encoder folder; pass the folder that holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        raise CheckpointError(path, problem)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            path, f"{CONFIG_FILE} is missing; this is not an omnienc encoder folder"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(path, f"{CONFIG_FILE} must hold a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(
            path, f"{CONFIG_FILE} has format {config.get('format')!r}, expected {FORMAT!r}"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"unsupported format_version {config.get('format_version')!r}; this omnienc reads "
            f"version {FORMAT_VERSION}",
        )
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(path, f"{CONFIG_FILE} lacks keys {missing}")
    return config


def load_encoder(path: str | Path) -> tuple[Encoder, Preprocessing]:
    """Load an exported encoder and its preprocessing, without unpickling anything.

    Args:
        path: The checkpoint folder written by :func:`save_encoder`, or a Hugging Face Hub id
            ``hf-hub:ORG/NAME[@REVISION]`` of one (downloaded or read from the Hub cache by
            :func:`omnienc.hub.resolve_checkpoint`).

    Returns:
        The encoder, in eval mode, and the preprocessing it was trained with.

    Raises:
        CheckpointError: Anything about the folder is missing, corrupt or inconsistent, or the
            Hub id cannot be resolved.
    """
    path = resolve_checkpoint(path)
    config = load_checkpoint_config(path)
    family, arch = config["family"], config["arch"]
    if family not in FAMILIES:
        raise CheckpointError(
            path, f"unknown encoder family {family!r}; known: {', '.join(sorted(FAMILIES))}"
        )
    if arch != family and arch not in ENCODERS:
        raise CheckpointError(
            path, f"unknown arch {arch!r}; known: {', '.join(sorted(ENCODERS))} or {family!r}"
        )
    try:
        encoder = encoder_from_config(family, config["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid {family} encoder config in {CONFIG_FILE}: {e}") from e
    if arch != family and arch_family(arch) != family:
        raise CheckpointError(path, f"arch {arch!r} is not of family {family!r}")
    if config["embed_dim"] != encoder.embed_dim:
        raise CheckpointError(
            path,
            f"embed_dim {config['embed_dim']} in {CONFIG_FILE} does not match the encoder its "
            f"config builds (embed_dim {encoder.embed_dim})",
        )
    try:
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid preprocessing in {CONFIG_FILE}: {e}") from e

    state = _read_weights(path, config["weights"], "weights")
    _load_state(path, encoder, state)
    return encoder.eval(), preprocessing


def load_extra(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Read the state dict of an extra module saved beside the encoder.

    Args:
        path: The checkpoint folder (or a Hub id, as for :func:`load_encoder`).
        name: The name the module was saved under.

    Returns:
        The module's state dict (CPU tensors); pass it to ``module.load_state_dict``.

    Raises:
        CheckpointError: The name is not in the checkpoint, or its file is missing or corrupt.
    """
    path = resolve_checkpoint(path)
    extras = load_checkpoint_config(path).get("extra", {})
    if name not in extras:
        raise CheckpointError(
            path, f"no extra module {name!r}; saved: {', '.join(sorted(extras)) or 'none'}"
        )
    return _read_weights(path, extras[name], f"extra {name!r}")


def _write_weights(module: nn.Module, file: Path) -> str:
    """Save a module's state dict as safetensors, fsync it, and return its sha256."""
    # clone() so that tied or overlapping tensors are stored separately, as safetensors requires.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(file))
    # safetensors creates the file 0600; give it the permissions of the umask like other files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    return file_sha256(file)


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_weights(path: Path, entry: Any, what: str) -> dict[str, torch.Tensor]:
    """Read one safetensors file of a checkpoint after checking its sha256."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise CheckpointError(path, f"{CONFIG_FILE}: {what} entry must name its file")
    name = entry["file"]
    file = path / name
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise CheckpointError(
            path, f"{what} file {name!r} must be a .safetensors file in the folder"
        )
    if not file.is_file():
        raise CheckpointError(path, f"{what} file {name} is missing")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise CheckpointError(
            path,
            f"{name} is corrupt: sha256 {digest} does not match {entry.get('sha256')} "
            f"recorded in {CONFIG_FILE}",
        )
    try:
        return load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types and some from Rust
        raise CheckpointError(path, f"{name} is not a readable safetensors file: {e}") from e


def state_mismatch(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """How a state dict differs from the one a module expects; empty when it fits.

    Args:
        expected: The module's own ``state_dict()``.
        state: The state dict read from a file.

    Returns:
        Missing keys, unexpected keys and shape mismatches (``key: checkpoint SHAPE vs model
        SHAPE``), each list cut after a dozen entries.
    """
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    shapes = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    problems += shapes[:_LIST_LIMIT]
    if len(shapes) > _LIST_LIMIT:
        problems.append(f"and {len(shapes) - _LIST_LIMIT} more shape mismatches")
    return problems


def _load_state(path: Path, encoder: Encoder, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``encoder``, or say exactly how they differ."""
    problems = state_mismatch(encoder.state_dict(), state)
    if problems:
        settings = ", ".join(f"{k}={v}" for k, v in encoder.config.to_dict().items())
        raise CheckpointError(
            path,
            f"{WEIGHTS_FILE} does not match the {encoder.family} encoder built from "
            f"{CONFIG_FILE} ({settings}): " + "; ".join(problems) + "; the weights come from "
            "an encoder of another architecture or input size than config.json describes",
        )
    encoder.load_state_dict(state, strict=True)


def _first(keys: list[str]) -> str:
    """``keys`` as a list literal, cut after ``_LIST_LIMIT`` entries."""
    if len(keys) <= _LIST_LIMIT:
        return str(keys)
    return f"{keys[:_LIST_LIMIT]} and {len(keys) - _LIST_LIMIT} more"
