"""The segmentation adapter's model: a light FPN decoder over a frozen (or fine-tuned) encoder.

The decoder reads every scale of ``encoder.forward_intermediates(x)`` the way a feature pyramid
network does (Lin et al., https://arxiv.org/abs/1612.03144), in the spirit of UNETR's decoder
over ViT features (https://arxiv.org/abs/2103.10504) but much lighter: a 1x1x1 lateral conv maps
each level to ``width`` channels, the coarser sum is upsampled and added level by level, a small
conv block follows at the finest level, a 1x1x1 conv gives the class logits, and they are
upsampled to the input size. It works for every encoder of :data:`omnienc.encoders.ENCODERS`:
the residual conv encoders have strides 2, 4, 8, 16 and the 3D ViTs one stride (its patch size)
for all four levels, where the top-down path is a plain sum.

:func:`save_segmentation_model` writes the decoder beside the exported encoder
(:data:`DECODER_NAME`); :func:`load_segmentation_model` reads both back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnienc.checkpoint import load_checkpoint_config, load_encoder, load_extra, save_encoder
from omnienc.config import JsonConfig
from omnienc.encoders.base import Encoder
from omnienc.errors import CheckpointError
from omnienc.preprocessing import Preprocessing

DECODER_NAME = "seg_decoder"  # name of the decoder weights beside an exported encoder


@dataclass(frozen=True)
class SegDecoderConfig(JsonConfig):
    """The decoder, its loss and its optimiser.

    Attributes:
        num_classes: Output classes ``K``, background (label 0) included; >= 2.
        width: Channels of the decoder's common feature width.
        freeze_encoder: Keep the encoder frozen (the adapter setting); ``False`` fine-tunes it.
        dice_weight: Weight of the Dice term of ``DiceCELoss``.
        ce_weight: Weight of its cross-entropy term.
        lr: Peak AdamW learning rate of the decoder.
        encoder_lr_scale: Encoder learning rate as a fraction of ``lr`` when fine-tuning.
        weight_decay: AdamW weight decay of kernels (not of biases and norm parameters).
        warmup_steps: Linear warm-up steps before the cosine decay to 5 % of ``lr``.
        overlap: Sliding-window overlap in validation and prediction, in ``[0, 1)``.
        sw_batch_size: Windows per forward pass in validation and prediction.
    """

    config_name = "segmentation decoder config"

    num_classes: int = 2
    width: int = 32
    freeze_encoder: bool = True
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    overlap: float = 0.25
    sw_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes counts background and must be >= 2, got {self.num_classes}"
            )
        if self.width < 1 or self.sw_batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("width and sw_batch_size must be >= 1 and warmup_steps >= 0")
        if min(self.dice_weight, self.ce_weight) < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        if self.lr <= 0 or self.encoder_lr_scale < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0; encoder_lr_scale and weight_decay >= 0")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")


def _upsample(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Upsample ``(B, C, d, h, w)`` by ``factor`` (trilinear) and crop to ``size`` at the high end.

    Feature voxel ``j`` of stride ``r`` covers input voxels ``[j r, (j + 1) r)``; scaling by the
    stride ratio with ``align_corners=False`` keeps those centres aligned, and the encoders'
    ``ceil`` rule means the upsampled grid covers ``size`` with at most ``factor - 1`` voxels to
    spare.
    """
    target = tuple(int(s) for s in size)
    up = tuple(int(s) * factor for s in x.shape[2:])
    if any(u < t for u, t in zip(up, target, strict=True)):
        raise ValueError(
            f"a stride-{factor} feature map {tuple(x.shape[2:])} cannot cover {target}: the "
            "encoder does not follow the ceil(n / stride) rule of the encoder contract"
        )
    if factor > 1:
        x = F.interpolate(x, size=up, mode="trilinear", align_corners=False)
    return x[:, :, : target[0], : target[1], : target[2]]


class SegmentationDecoder(nn.Module):
    """FPN-style decoder over an encoder's intermediate feature maps.

    Args:
        feature_info: The encoder's ``feature_info`` (``num_chs``, ``reduction`` per level,
            shallow to deep); each reduction must divide the next.
        num_classes: Output classes ``K`` (background included).
        width: Common channel width of the pyramid.
    """

    def __init__(
        self, feature_info: Sequence[Mapping[str, Any]], num_classes: int, width: int = 32
    ) -> None:
        super().__init__()
        reductions = [int(f["reduction"]) for f in feature_info]
        if not reductions:
            raise ValueError("feature_info is empty")
        if any(b % a for a, b in itertools.pairwise(reductions)):
            raise ValueError(f"each reduction must divide the next, got {reductions}")
        self.reductions = reductions
        self.num_classes, self.width = int(num_classes), int(width)
        self.lateral = nn.ModuleList(nn.Conv3d(int(f["num_chs"]), width, 1) for f in feature_info)
        groups = math.gcd(8, width)  # GroupNorm: works on a 1-voxel grid, unlike InstanceNorm
        self.block = nn.Sequential(
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.classifier = nn.Conv3d(width, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Class logits at the input resolution.

        Args:
            features: One ``(B, num_chs_i, D_i, H_i, W_i)`` map per ``feature_info`` entry.
            out_size: ``(D, H, W)`` of the encoder's input.

        Returns:
            ``(B, K, D, H, W)`` logits.
        """
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(features)}")
        x = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            skip = self.lateral[i](features[i])
            ratio = self.reductions[i + 1] // self.reductions[i]
            x = _upsample(x, ratio, skip.shape[2:]) + skip
        # The 1x1x1 classifier and trilinear upsampling are both linear (and the interpolation
        # weights sum to 1), so classifying before upsampling is exact and K/width times cheaper.
        logits = self.classifier(self.block(x))
        return _upsample(logits, self.reductions[0], out_size)


class SegmentationModel(nn.Module):
    """Encoder + segmentation decoder.

    With ``freeze_encoder`` the encoder's parameters get ``requires_grad=False``, its forward pass
    runs without autograd, and it stays in eval mode even when the model is put in training mode,
    so nothing about it changes while the decoder trains: no dropout, and no normalisation
    statistics are updated (InstanceNorm here tracks none, but a BatchNorm encoder would).

    Args:
        encoder: Any :class:`~omnienc.encoders.base.Encoder`.
        decoder: A decoder built for ``encoder.feature_info``.
        freeze_encoder: Freeze the encoder (``False``: train it with the decoder).

    Attributes:
        roi_size: Sliding-window size for whole volumes (set by :func:`train_segmentation` to its
            crop size), or ``None``.
    """

    def __init__(
        self, encoder: Encoder, decoder: SegmentationDecoder, freeze_encoder: bool = True
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.freeze_encoder = bool(freeze_encoder)
        self.roi_size: tuple[int, int, int] | None = None
        self.encoder.requires_grad_(not self.freeze_encoder)
        if self.freeze_encoder:
            self.encoder.eval()

    def train(self, mode: bool = True) -> SegmentationModel:
        """Set training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, K, D, H, W)``.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder.forward_intermediates(x)
        return self.decoder(feats, x.shape[2:])


def build_segmentation_model(encoder: Encoder, config: SegDecoderConfig) -> SegmentationModel:
    """A decoder for ``encoder`` as ``config`` says, and the two as one model."""
    decoder = SegmentationDecoder(encoder.feature_info, config.num_classes, config.width)
    return SegmentationModel(encoder, decoder, freeze_encoder=config.freeze_encoder)


def save_segmentation_model(
    model: SegmentationModel,
    path: str | Path,
    preprocessing: Preprocessing,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Export the encoder with the decoder beside it (``seg_decoder.safetensors``).

    ``meta["seg_decoder"]`` records the decoder's ``num_classes``, ``width``, the window size and
    whether the encoder was frozen; a fine-tuned encoder is saved with its new weights.
    """
    record = {
        "num_classes": model.decoder.num_classes,
        "width": model.decoder.width,
        "roi_size": list(model.roi_size) if model.roi_size else None,
        "freeze_encoder": model.freeze_encoder,
    }
    full_meta = {**(meta or {}), DECODER_NAME: record}
    return save_encoder(
        model.encoder, path, preprocessing, meta=full_meta, extra={DECODER_NAME: model.decoder}
    )


def load_segmentation_model(path: str | Path) -> tuple[SegmentationModel, Preprocessing]:
    """Load what :func:`save_segmentation_model` wrote; the model is in eval mode.

    Raises:
        CheckpointError: The checkpoint has no decoder, or its record or weights do not fit.
    """
    path = Path(path)
    encoder, preprocessing = load_encoder(path)
    record = (load_checkpoint_config(path).get("meta") or {}).get(DECODER_NAME)
    if not isinstance(record, dict):
        raise CheckpointError(
            path, f"no {DECODER_NAME!r} record in meta: not saved by save_segmentation_model"
        )
    try:
        decoder = SegmentationDecoder(encoder.feature_info, record["num_classes"], record["width"])
        decoder.load_state_dict(load_extra(path, DECODER_NAME), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"{DECODER_NAME} does not fit its record: {e}") from e
    model = SegmentationModel(encoder, decoder, freeze_encoder=bool(record.get("freeze_encoder")))
    roi = record.get("roi_size")
    model.roi_size = (int(roi[0]), int(roi[1]), int(roi[2])) if roi else None
    return model.eval(), preprocessing
