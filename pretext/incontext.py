"""Mask-guided in-context segmentation, the pretext task of MASS.

MASS (Gao et al., "Learning Generalizable 3D Medical Image Representations from Mask-Guided
Self-Supervision", https://arxiv.org/abs/2603.13660) pretrains a 3D encoder by in-context
segmentation of class-agnostic masks: two overlapping crops of one volume are drawn, the
*reference* weakly augmented and the *query* strongly; up to ``K`` mask proposals become task
channels; each task is encoded into tokens by masked average pooling of reference features; the
tokens are fused with the query features by attention; and one logit map per task segments the
same structure in the query. The loss is Dice + BCE.

This module holds the parts, assembled by the pretraining LightningModule:

* the two crops and task masks come from :mod:`omnienc.pretext.pairs`, their views from
  :mod:`omnienc.pretext.augment`;
* :class:`HeadConfig`, :class:`InContextHead`, :func:`build_incontext_head`: task tokens, fusion
  and per-task logits. The fusion is the two-way transformer of SAM's mask decoder (Kirillov et
  al., "Segment Anything", https://arxiv.org/abs/2304.02643), run once per task, from the
  blocks of :mod:`omnienc.pretext.fusion`;
* :func:`incontext_loss`: soft Dice + BCE over the valid tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnienc.config import JsonConfig
from omnienc.pretext.fusion import (
    Attention,
    TaskConvDecoder,
    TwoWayBlock,
    mlp,
    sinusoidal_position_encoding_3d,
    upsample_stride,
)

# --------------------------------------------------------------------------------------------
# Head: task tokens, two-way fusion, per-task logits
# --------------------------------------------------------------------------------------------


DECODERS = ("dot", "conv")


@dataclass(frozen=True)
class HeadConfig(JsonConfig):
    """Config of :class:`InContextHead`.

    Attributes:
        dim: Width of task tokens, fused query tokens and the per-voxel map.
        num_learned_tokens: Learned tokens added to every task's pooled tokens (MASS's learned
            queries; SAM's output tokens).
        depth: Two-way fusion blocks.
        num_heads: Attention heads; must divide ``dim``.
        token_scales: How many of the deepest encoder scales are pooled into task tokens (one
            token per scale and task).
        fuse_scales: How many of the deepest query scales are attention keys.
        mlp_ratio: Hidden width of the MLPs as a multiple of ``dim``.
        output_stride: Finest stride of the per-voxel map: the FPN runs down to the finest
            encoder scale whose stride is at least this (4: stride 4 on ``resconv``, whose
            scales are 2, 4, 8, 16; 2 adds the stride-2 scale; the ViT has only 16). A mask of
            a few hundred voxels is a handful of stride-4 cells; at 1,500 steps a stride-2 map
            raised that ceiling without raising the head's fit (benchmarks/results/pretrain.md,
            "third session").
        decoder: How the logits come from the task vector and the per-voxel map: ``"dot"``
            (SAM's dot product) or ``"conv"`` (the dot product plus a small per-task
            convolutional refinement, :class:`~omnienc.pretext.fusion.TaskConvDecoder`, as
            MASS decodes each task with its own decoder).
    """

    dim: int = 64
    num_learned_tokens: int = 2
    depth: int = 2
    num_heads: int = 4
    token_scales: int = 2
    fuse_scales: int = 2
    mlp_ratio: float = 2.0
    output_stride: int = 4
    decoder: str = "dot"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(
                f"need dim >= 1 divisible by num_heads >= 1, got {self.dim}, {self.num_heads}"
            )
        if self.num_learned_tokens < 0:
            raise ValueError(f"num_learned_tokens must be >= 0, got {self.num_learned_tokens}")
        for name in ("depth", "token_scales", "fuse_scales", "output_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")


def masked_average(feat: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of ``(B, C, l)`` features under ``(B, T, l)`` weights in [0, 1].

    Returns:
        The pooled ``(B, T, C)`` vectors and the ``(B, T)`` weight mass under each (an empty
        weight pools to zeros, never NaN).
    """
    mass = weight.sum(-1)
    return torch.einsum("btl,bcl->btc", weight, feat) / mass.clamp_min(1e-6)[..., None], mass


class InContextHead(nn.Module):
    """MASS's in-context segmentation head over any omnienc encoder's intermediates.

    1. **Task tokens** (MASS): the reference features of the ``token_scales`` deepest scales
       are projected to ``dim`` and average-pooled under each task mask (area-downsampled to
       the scale, so partial voxels count by their fraction); an empty mask pools to zeros,
       never NaN. Each pooled vector is layer-normed and gets a learned scale embedding: one
       token per scale, plus ``num_learned_tokens`` learned tokens, per task.
    2. **Fusion** (SAM's two-way transformer, https://arxiv.org/abs/2304.02643): the
       ``fuse_scales`` deepest query scales are projected, flattened and given a fixed 3D
       sinusoidal position encoding plus a learned level embedding; ``depth``
       :class:`TwoWayBlock` layers and a final token-to-query attention follow. Every task has
       its own copy of the (small) deep query tokens, so tasks never see each other: a task's
       logits do not depend on how many other (or padding) tasks are in the batch, and one
       task at inference behaves as in training.
    3. **Logits** (SAM's hypernetwork dot product): an MLP of the mean fused task token is
       dot-multiplied with a per-voxel map: a light top-down FPN of the query features at
       stride ``output_stride`` (or the finest stride >= it; stride 16 for the ViT) plus the
       task's fused deep query tokens, upsampled. The logit map is divided by ``sqrt(dim)``,
       offset by a learned bias (initialised at -2, a foreground prior of about 12%), and
       upsampled trilinearly to the output size. With ``decoder: conv`` a small per-task
       convolutional refinement is added to the logits (MASS decodes each task on its own).

    Args:
        feature_info: The encoder's ``feature_info``: dicts with ``num_chs`` and ``reduction``,
            shallow to deep.
        config: Sizes of the head.

    Raises:
        ValueError: ``token_scales`` or ``fuse_scales`` exceeds the encoder's number of scales.
    """

    def __init__(self, feature_info: Sequence[Mapping[str, Any]], config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        chans = [int(i["num_chs"]) for i in feature_info]
        self.strides = [int(i["reduction"]) for i in feature_info]
        n = len(chans)
        for name in ("token_scales", "fuse_scales"):
            if getattr(config, name) > n:
                raise ValueError(
                    f"HeadConfig.{name}={getattr(config, name)} exceeds the encoder's {n} scales"
                )
        dim = config.dim
        self.token_levels = list(range(n - config.token_scales, n))
        self.fuse_levels = list(range(n - config.fuse_scales, n))
        self.fpn_stride = min(
            (r for r in self.strides if r >= config.output_stride), default=max(self.strides)
        )
        self.fpn_levels = [i for i in range(n) if self.strides[i] >= self.fpn_stride]

        self.token_proj = nn.ModuleList(nn.Conv3d(chans[i], dim, 1) for i in self.token_levels)
        self.token_norm = nn.LayerNorm(dim)
        self.token_level_embed = nn.Parameter(torch.zeros(config.token_scales, dim))
        self.learned_tokens = nn.Parameter(torch.zeros(config.num_learned_tokens, dim))
        self.key_proj = nn.ModuleList(nn.Conv3d(chans[i], dim, 1) for i in self.fuse_levels)
        self.key_norm = nn.LayerNorm(dim)
        self.key_level_embed = nn.Parameter(torch.zeros(config.fuse_scales, dim))
        self.blocks = nn.ModuleList(
            TwoWayBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_attn = Attention(dim, config.num_heads)
        self.final_norm = nn.LayerNorm(dim)

        self.lateral = nn.ModuleList(nn.Conv3d(chans[i], dim, 1) for i in self.fpn_levels)
        self.smooth = nn.Sequential(
            nn.Conv3d(dim, dim, 3, padding=1, groups=dim),
            nn.GroupNorm(1, dim),
            nn.GELU(),
            nn.Conv3d(dim, dim, 1),
        )
        self.fused_proj = nn.Linear(dim, dim)
        self.task_mlp = mlp(dim, max(1, round(dim * config.mlp_ratio)), dim)
        self.task_decoder = (
            TaskConvDecoder(dim, max(1, dim // 2)) if config.decoder == "conv" else None
        )
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))
        for p in (self.token_level_embed, self.learned_tokens, self.key_level_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def task_tokens(
        self, ref_feats: Sequence[torch.Tensor], ref_masks: torch.Tensor
    ) -> torch.Tensor:
        """Encode every task mask into tokens by masked average pooling (MASS).

        Args:
            ref_feats: Reference intermediates, ``(B, C_i, d_i, h_i, w_i)`` per scale.
            ref_masks: ``(B, T, D, H, W)`` masks in [0, 1] on the reference crop.

        Returns:
            ``(B, T, token_scales + num_learned_tokens, dim)``.
        """
        b, t = ref_masks.shape[:2]
        masks = ref_masks.to(ref_feats[-1].dtype)
        tokens = []
        for j, (level, proj) in enumerate(zip(self.token_levels, self.token_proj, strict=True)):
            d, h, w = ref_feats[level].shape[2:]
            feat = proj(ref_feats[level]).flatten(2)  # (B, dim, l)
            weight = F.adaptive_avg_pool3d(masks, (d, h, w)).flatten(2)  # (B, T, l)
            pooled, _ = masked_average(feat, weight)
            tokens.append(self.token_norm(pooled) + self.token_level_embed[j])
        learned = self.learned_tokens.expand(b, t, -1, -1)
        return torch.cat([torch.stack(tokens, dim=2), learned.to(tokens[0].dtype)], dim=2)

    def forward(
        self,
        ref_feats: Sequence[torch.Tensor],
        ref_masks: torch.Tensor,
        query_feats: Sequence[torch.Tensor],
        out_size: Sequence[int],
    ) -> torch.Tensor:
        """Segment every task of the reference in the query.

        Args:
            ref_feats: ``encoder.forward_intermediates(ref_image)``: ``(B, C_i, d_i, h_i, w_i)``
                per scale of ``feature_info``.
            ref_masks: ``(B, T, D_r, H_r, W_r)`` task masks in [0, 1] on the reference crop
                (any float or bool dtype; an all-zero task is allowed).
            query_feats: ``encoder.forward_intermediates(query_image)``, as ``ref_feats``.
            out_size: ``(D, H, W)`` of the logits, normally the query crop size.

        Returns:
            ``(B, T, D, H, W)`` logits.
        """
        if len(ref_feats) != len(self.strides) or len(query_feats) != len(self.strides):
            raise ValueError(
                f"expected {len(self.strides)} feature maps per crop, got {len(ref_feats)} and "
                f"{len(query_feats)}"
            )
        b, t = ref_masks.shape[:2]
        dim = self.config.dim
        tokens = self.task_tokens(ref_feats, ref_masks).flatten(0, 1)  # (B*T, N, dim)

        image, pe, grids = [], [], []
        for j, (level, proj) in enumerate(zip(self.fuse_levels, self.key_proj, strict=True)):
            feat = query_feats[level]
            grids.append(tuple(feat.shape[2:]))
            image.append(self.key_norm(proj(feat).flatten(2).transpose(1, 2)))
            enc = sinusoidal_position_encoding_3d(grids[-1], self.strides[level], dim, feat.device)
            pe.append(enc.to(image[-1].dtype) + self.key_level_embed[j])
        image_pe = torch.cat(pe, dim=0)  # (L, dim)
        fused = torch.cat(image, dim=1).repeat_interleave(t, dim=0)  # (B*T, L, dim)
        for block in self.blocks:
            tokens, fused = block(tokens, fused, image_pe)
        tokens = self.final_norm(tokens + self.final_attn(tokens, fused + image_pe, fused))
        task = self.task_mlp(tokens.mean(dim=1))  # (B*T, dim)

        # Shared top-down FPN map of the query at stride fpn_stride.
        levels = self.fpn_levels
        x = self.lateral[-1](query_feats[levels[-1]])
        for k in range(len(levels) - 2, -1, -1):
            feat = query_feats[levels[k]]
            ratio = self.strides[levels[k + 1]] // self.strides[levels[k]]
            x = upsample_stride(x, ratio, feat.shape[2:]) + self.lateral[k](feat)
        pixel = self.smooth(x)  # (B, dim, g)
        grid = pixel.shape[2:]
        logits = torch.einsum("btc,bcxyz->btxyz", task.view(b, t, dim), pixel)

        # Each task's fused deep query tokens, dotted at their own scale, then upsampled (both
        # are linear, so this equals upsampling the tokens first, at a fraction of the cost).
        start = 0
        for level, g in zip(self.fuse_levels, grids, strict=True):
            n = g[0] * g[1] * g[2]
            part = self.fused_proj(fused[:, start : start + n])  # (B*T, n, dim)
            start += n
            dots = torch.einsum("nlc,nc->nl", part, task).view(b * t, 1, *g)
            ratio = self.strides[level] // self.fpn_stride
            logits = logits + upsample_stride(dots, ratio, grid).reshape(b, t, *grid)

        logits = logits / math.sqrt(dim) + self.logit_bias
        if self.task_decoder is not None:
            logits = logits + self.task_decoder(pixel, task.view(b, t, dim))
        return upsample_stride(logits, self.fpn_stride, out_size)


def build_incontext_head(
    feature_info: Sequence[Mapping[str, Any]], config_dict: Mapping[str, Any] | None = None
) -> InContextHead:
    """Build an :class:`InContextHead` from a :class:`HeadConfig` dict (as stored in a checkpoint).

    Args:
        feature_info: The encoder's ``feature_info``.
        config_dict: ``HeadConfig.to_dict()`` output; missing keys take defaults, ``None`` means
            all defaults.

    Raises:
        ValueError: A key is unknown or a value invalid for this encoder.
    """
    return InContextHead(feature_info, HeadConfig.from_dict(config_dict or {}))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

DICE_SMOOTH = 1e-5


def incontext_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Soft Dice + BCE per task, averaged over the valid tasks (MASS's segmentation loss).

    Per task, with ``p = sigmoid(logits)`` and target ``y`` over its voxels,
    ``dice = (2 * sum(p * y) + eps) / (sum(p) + sum(y) + eps)`` (``eps = 1e-5``, as nnU-Net) and
    ``bce`` is the mean binary cross-entropy; the loss is ``mean(1 - dice)`` over valid tasks
    whose target is not empty plus ``mean(bce)`` over all valid tasks. An empty target (a
    structure absent from the query, :attr:`omnienc.pretext.pairs.PairConfig.absent_tasks`)
    is learned through the BCE alone: its soft Dice is ``eps / (sum(p) + eps)``, near 0 for any
    prediction that is not exactly empty, a loss of about 1 that no threshold-level prediction
    can lower. MASS uses an adaptive Tversky-style Dice; this is the plain soft Dice. Computed
    in float32 with autocast off (as dinov2's KoLeo loss), whatever the training precision.

    Args:
        logits: ``(B, T, *spatial)``.
        target: ``(B, T, *spatial)`` in [0, 1] (float or bool).
        valid: ``(B, T)`` bool; invalid (padding) tasks count nowhere.

    Returns:
        ``{"loss": scalar with a graph, "dice": mean soft Dice coefficient over the non-empty
        targets (detached), "bce": mean BCE (detached), "num_valid": number of valid tasks
        (float)}``. With no valid task, ``loss`` is a zero that still has a graph
        (``0 * logits.sum()``) and ``dice`` and ``bce`` are 0.

    Raises:
        ValueError: Shapes disagree.
    """
    if logits.shape != target.shape or logits.shape[:2] != valid.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, target {tuple(target.shape)} and valid "
            f"{tuple(valid.shape)} must be (B, T, ...), (B, T, ...) and (B, T)"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float().flatten(2)
        y = target.float().flatten(2)
        w = valid.to(torch.float32)
        n = w.sum()
        if n == 0:
            zero = torch.zeros((), device=logits.device)
            return {"loss": x.sum() * 0.0, "dice": zero, "bce": zero, "num_valid": n}
        p = torch.sigmoid(x)
        dice = (2.0 * (p * y).sum(-1) + DICE_SMOOTH) / (p.sum(-1) + y.sum(-1) + DICE_SMOOTH)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(-1)
        w_dice = w * (y.sum(-1) > 0)
        n_dice = w_dice.sum()
        dice_mean = (dice * w_dice).sum() / n_dice.clamp_min(1.0)
        bce_mean = (bce * w).sum() / n
        dice_loss = (n_dice > 0).float() * (1.0 - dice_mean)
        return {
            "loss": dice_loss + bce_mean,
            "dice": dice_mean.detach(),
            "bce": bce_mean.detach(),
            "num_valid": n,
        }
