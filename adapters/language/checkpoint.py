"""The projector folder on disk, and text generation for a volume from it.

An aligned run exports the frozen encoder and the projector side by side::

    RUN_DIR/encoder/     the frozen encoder (omnienc checkpoint)
    RUN_DIR/projector/   projector.safetensors + config.json (kind, sizes, prompt, and the
                         fingerprints of the encoder and LM it was trained with)

:func:`save_projector` / :func:`load_projector` write and check that folder,
:func:`load_vision_language` assembles encoder, projector and LM again, and :func:`describe`
(``omnienc describe CKPT VOLUME --lm PATH``) generates text for a volume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from omnienc.adapters.language.model import VisionLanguageModel, lm_fingerprint, load_causal_lm
from omnienc.adapters.language.projector import Projector, ProjectorConfig, build_projector
from omnienc.adapters.language.tokens import load_encoder_spec, volume_tokens
from omnienc.atomic import atomic_target, write_bytes_atomic
from omnienc.checkpoint import file_sha256
from omnienc.encoders import RANDOM_PREFIX
from omnienc.encoders.base import Encoder
from omnienc.errors import CheckpointError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

PROJECTOR_FORMAT = "omnienc-projector"
PROJECTOR_FORMAT_VERSION = 1
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "config.json"


# -------------------------------------------------------------------------------- export, load


def save_projector(model: VisionLanguageModel, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``projector.safetensors`` and ``config.json`` (written last; it holds the sha256).

    Args:
        model: The aligned model.
        folder: The projector folder (created if needed).
        info: JSON facts: ``encoder`` and ``lm`` (each with ``fingerprint``), ``meta``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    projector = model.projector
    state = {k: v.detach().cpu().contiguous().clone() for k, v in projector.state_dict().items()}
    with atomic_target(folder / PROJECTOR_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    config = {
        "format": PROJECTOR_FORMAT,
        "format_version": PROJECTOR_FORMAT_VERSION,
        "projector": projector.config.to_dict(),
        "in_dim": projector.in_dim,
        "out_dim": projector.out_dim,
        "prompt": model.prompt,
        "tokens": "deepest feature map (forward_features), flattened in raster order",
        **info,
        "weights": {
            "file": PROJECTOR_WEIGHTS,
            "sha256": file_sha256(folder / PROJECTOR_WEIGHTS),
        },
    }
    write_bytes_atomic(folder / PROJECTOR_CONFIG, json.dumps(config, indent=2).encode() + b"\n")
    return folder


def load_projector(folder: str | Path) -> tuple[Projector, dict[str, Any]]:
    """Read a projector folder without unpickling anything.

    Returns:
        ``(projector in eval mode, its config.json)``.

    Raises:
        CheckpointError: The folder or a file is missing, corrupt, or does not match its config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "projector folder does not exist")
    try:
        config = json.loads((folder / PROJECTOR_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            folder, f"{PROJECTOR_CONFIG} is missing: not a projector folder"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(folder, f"{PROJECTOR_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != PROJECTOR_FORMAT:
        raise CheckpointError(folder, f"{PROJECTOR_CONFIG} is not an omnienc projector config")
    if config.get("format_version") != PROJECTOR_FORMAT_VERSION:
        raise CheckpointError(
            folder, f"unsupported projector format_version {config.get('format_version')!r}"
        )
    try:
        pconfig = ProjectorConfig.from_dict(config["projector"])
        projector = build_projector(pconfig, int(config["in_dim"]), int(config["out_dim"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(folder, f"invalid projector config: {exc}") from exc
    weights = folder / PROJECTOR_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(folder, f"{PROJECTOR_WEIGHTS} is missing")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != config.get("weights", {}).get("sha256"):
        raise CheckpointError(
            folder, f"{PROJECTOR_WEIGHTS} is corrupt: its sha256 differs from {PROJECTOR_CONFIG}"
        )
    try:
        projector.load_state_dict(load_safetensors_bytes(data), strict=True)
    except Exception as exc:  # safetensors' own errors, and load_state_dict's RuntimeError
        raise CheckpointError(
            folder, f"{PROJECTOR_WEIGHTS} does not fit its config: {exc}"
        ) from exc
    return projector.eval(), config


def _lm_info(path: str | Path, lm: nn.Module) -> dict[str, Any]:
    cfg = lm.config
    return {
        "path": str(path),
        "fingerprint": lm_fingerprint(path),
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": int(lm.get_input_embeddings().embedding_dim),  # type: ignore[operator]
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def load_vision_language(
    checkpoint: str | Path, lm: str | Path, projector: str | Path | None = None
) -> tuple[VisionLanguageModel, Encoder, Preprocessing, dict[str, Any]]:
    """Encoder + projector + LM, after checking that they belong together.

    Args:
        checkpoint: The encoder: a checkpoint folder or ``random:ARCH[:SEED]``.
        lm: The LM folder the projector was aligned with.
        projector: The projector folder (default: ``projector`` beside ``checkpoint``).

    Raises:
        CheckpointError: A folder is missing or corrupt, or the encoder or LM is not the one
            the projector was aligned with (the message names both).
    """
    ckpt_text = str(checkpoint)
    encoder, pre, info = load_encoder_spec(checkpoint)
    if projector is None:
        if ckpt_text.startswith(RANDOM_PREFIX):
            raise CheckpointError(Path(ckpt_text), "a random-init encoder needs --projector DIR")
        projector = Path(checkpoint).parent / "projector"
        if not projector.is_dir():
            raise CheckpointError(
                projector,
                f"no projector beside {checkpoint}; pass --projector DIR (the projector/ folder "
                "of an `omnienc align` run)",
            )
    proj, config = load_projector(projector)
    config = {**config, "folder": str(projector)}
    want = config.get("encoder", {})
    if info["fingerprint"] != want.get("fingerprint"):
        raise CheckpointError(
            Path(ckpt_text),
            f"this encoder ({info['fingerprint'][:19]}…) is not the one projector {projector} was "
            f"aligned with ({str(want.get('fingerprint'))[:19]}…, from {want.get('source')})",
        )
    model, tokenizer = load_causal_lm(lm)
    lm_info = _lm_info(lm, model)
    want_lm = config.get("lm", {})
    if lm_info["hidden_size"] != config["out_dim"]:
        raise CheckpointError(
            Path(lm),
            f"hidden size {lm_info['hidden_size']} differs from the projector's output width "
            f"{config['out_dim']} ({projector} was aligned with {want_lm.get('path')})",
        )
    if lm_info["fingerprint"] != want_lm.get("fingerprint"):
        raise CheckpointError(
            Path(lm),
            f"these LM weights are not the ones projector {projector} was aligned with "
            f"({want_lm.get('path')}); pass that LM folder with --lm",
        )
    return VisionLanguageModel(proj, model, tokenizer, config["prompt"]), encoder, pre, config


@dataclass
class Description:
    """What :func:`describe` returns.

    Attributes:
        text: The generated text.
        templated: Whether the projector was trained on templated text.
        projector: The projector folder used.
    """

    text: str
    templated: bool
    projector: str


def describe(
    checkpoint: str | Path,
    volume: str | Path,
    lm: str | Path,
    projector: str | Path | None = None,
    max_new_tokens: int | None = None,
    frame: int | None = None,
) -> Description:
    """Generate text for one volume (greedy).

    The volume gets the encoder's preprocessing and is encoded whole; the projector was trained
    on the item sizes of its data (e.g. 64 mm crops), so describe volumes of that kind.

    Args:
        checkpoint: Encoder checkpoint folder (or ``random:ARCH[:SEED]``).
        volume: A volume file or DICOM series folder.
        lm: The LM folder the projector was aligned with.
        projector: The projector folder (default: ``projector`` beside ``checkpoint``).
        max_new_tokens: Longest text (default: the projector's recorded value, else 40).
        frame: Frame of a 4D file.

    Raises:
        CheckpointError: See :func:`load_vision_language`.
        VolumeReadError: The volume cannot be read.
    """
    model, encoder, pre, config = load_vision_language(checkpoint, lm, projector)
    out = preprocess_volume(read_volume(volume, frame=frame), pre)
    tokens, pos = volume_tokens(encoder, torch.from_numpy(out["image"])[None])
    with torch.inference_mode():
        prefix = model.prefix(tokens, None, pos[None])
        limit = max_new_tokens or int(config.get("max_new_tokens", 40))
        text = model.generate(prefix, limit)[0]
    meta = config.get("meta", {})
    return Description(text, bool(meta.get("templated", False)), config["folder"])
