"""Prototype matching on the encoder's own features: a parameter-free in-context loss.

The in-context head (:mod:`omnienc.pretext.incontext`) learns to find a reference structure in
the query, but the matching is done by the head's attention and dot products, so nothing asks
the encoder's features *themselves* to match: at 192 mm the frozen-feature prototype baseline
scores level with a random-init encoder (``benchmarks/results/pretrain.md``, finding 25).

This objective asks it directly, on the same pair, tasks and encoder pass. It is the
segmentation loss of PANet (Wang et al., ICCV 2019, https://arxiv.org/abs/1908.06391) without
its learned parts, at every chosen scale of the encoder:

1. the reference features are average-pooled under each task mask (the *foreground* prototype)
   and under its complement in the crop (the *background* prototype), the masks
   area-downsampled to the scale as the head and the prototype baseline do;
2. every query voxel gets the cosine similarity to both prototypes, scaled by ``scale``
   (PANet's alpha = 20); their softmax is the probability of the structure;
3. the loss is the binary cross-entropy against the query mask area-downsampled to the scale
   (soft targets), averaged over voxels, valid tasks and scales.

A structure absent from the query (an empty target) is learned as "background everywhere". A
task whose mask fills (or misses) the reference crop at a scale has no background (foreground)
prototype there and is left out of that scale's mean. The loss is the plain mean over the chosen
scales, so a scale where no task counts (on 32^3 crops the deepest grid is 2^3 cells, and a small
task covers less than half a cell of it) adds a zero and weighs the other scales down for that
batch; the committed runs (``benchmarks/results/pretrain.md``, findings 42-44) used this mean. It
has no parameters, so it adds nothing to the checkpoint; it costs a few matrix products per
scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omnienc.config import JsonConfig
from omnienc.pretext.incontext import DICE_SMOOTH, masked_average

MIN_POOL = 0.5
"""Least pooled mask weight, in cells of a scale, for a prototype to count (half a cell)."""


@dataclass(frozen=True)
class MatchingConfig(JsonConfig):
    """Config of :func:`prototype_matching_loss`.

    Attributes:
        scales: How many of the encoder's deepest scales are matched (1 = the deepest only);
            ``0`` matches all of them, as the frozen prototype baseline does.
        scale: Multiplier of the cosine similarities before the softmax (PANet: 20), > 0.
    """

    scales: int = 0
    scale: float = 20.0

    def __post_init__(self) -> None:
        if self.scales < 0:
            raise ValueError(f"scales must be >= 0 (0 = all), got {self.scales}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def prototype_matching_loss(
    ref_feats: Sequence[torch.Tensor],
    ref_masks: torch.Tensor,
    query_feats: Sequence[torch.Tensor],
    query_masks: torch.Tensor,
    valid: torch.Tensor,
    config: MatchingConfig | None = None,
) -> dict[str, torch.Tensor]:
    """PANet's foreground/background prototype loss at the chosen scales.

    Computed in float32 with autocast off, whatever the training precision.

    Args:
        ref_feats: Reference intermediates, ``(B, C_i, d_i, h_i, w_i)`` per scale, shallow to
            deep (``encoder.forward_intermediates``).
        ref_masks: ``(B, T, D, H, W)`` task masks in [0, 1] on the reference crop.
        query_feats: Query intermediates, shaped as ``ref_feats``.
        query_masks: ``(B, T, D, H, W)`` targets in [0, 1] on the query crop.
        valid: ``(B, T)`` bool; padding tasks count nowhere.
        config: Scales and similarity scale.

    Returns:
        ``{"loss": scalar with a graph, "dice": mean soft Dice of the finest matched scale's
        probabilities against its targets, over the tasks that count there and have a
        non-empty target (detached; a readout, not a loss; 0 when there is no such task)}``.
        With no task that counts, ``loss`` is a zero with a graph.

    Raises:
        ValueError: The feature lists, a reference map and its query map, or the mask shapes
            disagree, or ``config.scales`` exceeds the number of scales.
    """
    config = config or MatchingConfig()
    n = len(ref_feats)
    if n == 0 or len(query_feats) != n:
        raise ValueError(f"need one query map per reference map, got {n} and {len(query_feats)}")
    if ref_masks.shape != query_masks.shape or ref_masks.shape[:2] != valid.shape:
        raise ValueError(
            f"ref_masks {tuple(ref_masks.shape)}, query_masks {tuple(query_masks.shape)} and "
            f"valid {tuple(valid.shape)} must be (B, T, D, H, W), (B, T, D, H, W) and (B, T)"
        )
    for level, (f_ref, f_query) in enumerate(zip(ref_feats, query_feats, strict=True)):
        if f_ref.shape != f_query.shape:
            raise ValueError(
                f"scale {level}: reference map {tuple(f_ref.shape)} and query map "
                f"{tuple(f_query.shape)} must have one shape"
            )
    if config.scales > n:
        raise ValueError(f"MatchingConfig.scales={config.scales} exceeds the encoder's {n} scales")
    levels = range(n - config.scales if config.scales else 0, n)
    device = ref_feats[-1].device
    with torch.autocast(device_type=device.type, enabled=False):
        ok = valid.to(device, torch.bool)
        ref_m, query_m = ref_masks.to(device, torch.float32), query_masks.to(device, torch.float32)
        losses, dice = [], ref_m.new_zeros(())
        for level in levels:
            f_ref, f_query = ref_feats[level].float(), query_feats[level].float()
            d, h, w = (int(s) for s in f_ref.shape[2:])
            fg_w = F.adaptive_avg_pool3d(ref_m, (d, h, w)).flatten(2)  # (B, T, l)
            y = F.adaptive_avg_pool3d(query_m, (d, h, w)).flatten(2)
            fg, fg_mass = masked_average(f_ref.flatten(2), fg_w)
            bg, bg_mass = masked_average(f_ref.flatten(2), 1.0 - fg_w)
            counts = ok & (fg_mass >= MIN_POOL) & (bg_mass >= MIN_POOL)  # (B, T)
            q = F.normalize(f_query.flatten(2), dim=1)  # (B, C, l)
            sim_fg = torch.einsum("btc,bcl->btl", F.normalize(fg, dim=-1), q)
            sim_bg = torch.einsum("btc,bcl->btl", F.normalize(bg, dim=-1), q)
            logits = config.scale * (sim_fg - sim_bg)  # softmax over (fg, bg) as a sigmoid
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
            weight = counts.float()
            losses.append((bce * weight).sum() / weight.sum().clamp_min(1.0))
            if level == levels[0]:
                p = torch.sigmoid(logits.detach())
                soft = (2 * (p * y).sum(-1) + DICE_SMOOTH) / (p.sum(-1) + y.sum(-1) + DICE_SMOOTH)
                has = weight * (y.sum(-1) > 0).float()
                dice = (soft * has).sum() / has.sum().clamp_min(1.0)
        loss = torch.stack(losses).mean()
    return {"loss": loss, "dice": dice}
