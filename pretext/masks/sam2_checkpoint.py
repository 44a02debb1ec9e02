"""Loading SAM2 (Ravi et al., https://arxiv.org/abs/2408.00714) for the ``sam2`` mask provider.

One SAM2 video checkpoint (``model_type`` ``sam2_video``, as the ``facebook/sam2.1-hiera-*``
repositories are) gives both models that :mod:`omnienc.pretext.masks.sam2` drives: transformers'
``Sam2VideoModel`` and ``Sam2Model``, the latter built from the video config's image parts and
the same weights. Nothing is downloaded unless the user names a hub id and has internet.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from omnienc.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Sam2Models:
    """The two SAM2 models of one checkpoint, on one device.

    Attributes:
        image: ``Sam2Model`` (automatic masks on seed slices).
        video: ``Sam2VideoModel`` (propagation).
        source: The folder or hub id they came from.
    """

    image: Any
    video: Any
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.video.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.video.config.image_size)


def _checkpoint_error(source: str, problem: str) -> CheckpointError:
    return CheckpointError(
        source,
        f"{problem}. Pass --sam2 (MaskConfig.sam2) a folder holding a SAM2 video checkpoint "
        "(config.json with model_type 'sam2_video' and its weights, e.g. saved by "
        "Sam2VideoModel.save_pretrained or `hf download facebook/sam2.1-hiera-tiny "
        "--local-dir DIR`), or a hub id such as facebook/sam2.1-hiera-tiny on a machine with "
        "internet (with HF_HUB_OFFLINE=1 only ids already in the Hugging Face cache load)",
    )


@lru_cache(maxsize=2)
def load_sam2(source: str, device: str | None = None) -> Sam2Models:
    """Load ``Sam2Model`` and ``Sam2VideoModel`` from a local folder or a hub id, in eval mode.

    A hub id is fetched by ``from_pretrained`` (its cache first; only ``local_files_only`` when
    ``HF_HUB_OFFLINE`` is set). Loads are cached per ``(source, device)`` within a process.

    Args:
        source: A folder (``config.json`` with ``model_type`` ``sam2_video`` + weights) or an id.
        device: Torch device; default CUDA when available, else CPU.

    Raises:
        CheckpointError: The folder is missing or not a SAM2 video checkpoint, or the id cannot
            be loaded; the message names ``source`` and what to pass instead.
    """
    from transformers import AutoConfig, Sam2Config, Sam2Model, Sam2VideoModel

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _checkpoint_error(str(path), "not a folder with a config.json")
        where = str(path)
    elif _HUB_ID.match(source) and not source.startswith((".", "~")):
        where = source
    else:
        raise _checkpoint_error(source, "no such SAM2 checkpoint folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline)
    except (OSError, ValueError) as exc:
        problem = (
            f"cannot read its config.json ({type(exc).__name__})"
            if path.exists()
            else "no such folder, and as a hub id it is not in the local Hugging Face cache "
            + ("(HF_HUB_OFFLINE is set)" if offline else "and could not be fetched")
        )
        raise _checkpoint_error(source, problem) from None
    if getattr(config, "model_type", None) != "sam2_video":
        raise _checkpoint_error(
            source,
            f"config.json describes a {getattr(config, 'model_type', None)!r} model, not a "
            "SAM2 video checkpoint (model_type 'sam2_video')",
        )
    image_config = Sam2Config(
        vision_config=config.vision_config.to_dict(),
        prompt_encoder_config=_without_type(config.prompt_encoder_config.to_dict()),
        mask_decoder_config=_without_type(config.mask_decoder_config.to_dict()),
    )
    video: Any
    image: Any
    try:
        video = Sam2VideoModel.from_pretrained(where, local_files_only=offline)
        image = Sam2Model.from_pretrained(where, config=image_config, local_files_only=offline)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _checkpoint_error(source, f"cannot load the weights ({exc})") from None
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Sam2Models(image.to(target).eval(), video.to(target).eval(), source)


def _without_type(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "model_type"}
