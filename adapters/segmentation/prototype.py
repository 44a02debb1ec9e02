"""Frozen-feature prototype matching: few-shot segmentation with an encoder and no head.

The training-free baseline of few-shot segmentation with frozen features (masked average pooling
into a class prototype and cosine matching, as in PANet, Wang et al., ICCV 2019,
https://arxiv.org/abs/1908.06391, here with no background prototype and no training):

1. :func:`support_prototypes`: the support crop (centred on its mask, see
   :func:`~.windows.centred_crop`) goes through the frozen encoder; at every
   scale of ``forward_intermediates`` the features are averaged under the mask
   (area-downsampled to the scale, so partial voxels count by their fraction): one prototype
   per scale. Several supports are combined by averaging their prototypes
   (:func:`mean_prototypes`).
2. :func:`window_similarity`: a query window's cosine similarity to the prototype at every
   scale, upsampled trilinearly to the finest scale, averaged over the scales and upsampled to
   the window; windows are blended over the query by
   :class:`~omnienc.adapters.segmentation.windows.WindowFeatures`.
3. :func:`best_threshold`: the threshold is the one that maximises the Dice of the support's
   own similarity map against its mask, so nothing is tuned on the query.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from omnienc.encoders import Encoder


def _device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def pool_prototypes(feats: Sequence[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Masked average pooling of a support crop's features, one prototype per scale.

    Args:
        feats: ``forward_intermediates`` of the crop: ``(1, C_i, d_i, h_i, w_i)`` per scale.
        mask: ``(1, 1, S_x, S_y, S_z)`` mask in [0, 1] on the crop.

    Returns:
        One ``(C_i,)`` float32 tensor per scale, on the CPU.
    """
    out = []
    for f in feats:
        d, h, w = (int(n) for n in f.shape[2:])
        weight = F.adaptive_avg_pool3d(mask.to(f.device, torch.float32), (d, h, w))
        pooled = (f.float() * weight).sum(dim=(0, 2, 3, 4))
        out.append((pooled / weight.sum().clamp_min(1e-6)).cpu())
    return out


def support_prototypes(
    encoder: Encoder, ref_image: np.ndarray, ref_mask: np.ndarray
) -> list[torch.Tensor]:
    """The prototypes of one support crop (:func:`pool_prototypes` of its features).

    Args:
        encoder: A frozen encoder.
        ref_image: ``(S_x, S_y, S_z)`` preprocessed support crop.
        ref_mask: ``(S_x, S_y, S_z)`` mask in [0, 1] on the crop, not empty.

    Returns:
        One ``(C_i,)`` float32 tensor per entry of ``encoder.feature_info``, on the CPU.

    Raises:
        ValueError: The mask is empty.
    """
    if not np.any(ref_mask > 0):
        raise ValueError("the support mask is empty on its crop")
    device = _device(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(ref_image, np.float32))[None, None].to(device)
            mask = torch.from_numpy(np.asarray(ref_mask, np.float32))[None, None]
            return pool_prototypes(encoder.forward_intermediates(x), mask)
    finally:
        encoder.train(was_training)


def mean_prototypes(prototypes: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The k-shot prototype: the mean over supports of each scale's prototype.

    Args:
        prototypes: One :func:`support_prototypes` result per support.

    Returns:
        One ``(C_i,)`` tensor per scale.
    """
    if not prototypes:
        raise ValueError("need at least one support's prototypes")
    return [torch.stack(list(scale)).mean(dim=0) for scale in zip(*prototypes, strict=True)]


def window_similarity(
    feats: Sequence[torch.Tensor], prototypes: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """Cosine similarity of query windows to prototypes, averaged over the scales.

    Each scale's similarity map is upsampled trilinearly to the finest scale's grid, the maps
    are averaged there, and the mean is upsampled to the window. Several prototypes are matched
    in one pass (the features' norms are computed once).

    Args:
        feats: The windows' ``forward_intermediates``: ``(n, C_i, d_i, h_i, w_i)`` per scale,
            shallow (finest) to deep.
        prototypes: Per scale, ``(C_i,)`` (one prototype, as :func:`support_prototypes`
            returns) or ``(P, C_i)`` (``P`` prototypes).
        size: ``(S_x, S_y, S_z)`` window size.

    Returns:
        ``(n, P, S_x, S_y, S_z)`` float32 in [-1, 1] (``P = 1`` for single prototypes).
    """
    if len(feats) != len(prototypes) or not feats:
        raise ValueError(f"{len(feats)} feature scales but {len(prototypes)} prototypes")
    protos = [p[None] if p.ndim == 1 else p for p in prototypes]
    grid = tuple(int(n) for n in feats[0].shape[2:])
    total = torch.zeros((feats[0].shape[0], protos[0].shape[0], *grid), device=feats[0].device)
    for f, p in zip(feats, protos, strict=True):
        f = f.float()
        unit = p.to(device=f.device, dtype=torch.float32)
        unit = unit / torch.linalg.vector_norm(unit, dim=1, keepdim=True).clamp_min(1e-6)
        dot = torch.einsum("ncxyz,pc->npxyz", f, unit)
        sim = dot / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-6)
        if tuple(sim.shape[2:]) != grid:
            sim = F.interpolate(sim, size=grid, mode="trilinear", align_corners=False)
        total += sim
    out = F.interpolate(total / len(feats), size=tuple(size), mode="trilinear", align_corners=False)
    return out.clamp(-1.0, 1.0)


def best_threshold(similarity: np.ndarray, mask: np.ndarray) -> float:
    """The threshold that maximises the Dice of ``similarity > t`` against ``mask``.

    Every distinct cut of the sorted values is tried (exactly, in ``O(N log N)``); the
    threshold returned is midway between the last value kept and the first one left out.

    Args:
        similarity: ``(X, Y, Z)`` scores.
        mask: ``(X, Y, Z)`` bool, not empty.

    Returns:
        The threshold.
    """
    values = np.asarray(similarity, np.float64).ravel()
    truth = np.asarray(mask, bool).ravel()
    n_true = int(truth.sum())
    if n_true == 0:
        raise ValueError("the mask is empty")
    order = np.argsort(-values, kind="stable")
    v, hits = values[order], np.cumsum(truth[order])
    # Only cut between distinct values: ties are kept or left out together.
    ends = np.flatnonzero(np.append(v[1:] != v[:-1], True))
    dice = 2.0 * hits[ends] / (ends + 1 + n_true)
    k = int(ends[int(np.argmax(dice))])
    return float(v[k] - 1.0) if k + 1 == v.size else float((v[k] + v[k + 1]) / 2.0)
