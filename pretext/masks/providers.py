"""The name -> provider dict (:data:`MASK_PROVIDERS`) and :func:`propose_masks`, which runs them.

:func:`propose_masks` runs the providers named in a
:class:`~omnienc.pretext.masks.config.MaskConfig`, keeps masks that lie mostly inside the body
(clipped to it, then opened to cut one-voxel leaks) and whose size is within bounds, interleaves
the providers' ranked lists round-robin (rank within its provider is the score), drops every
mask whose 3D IoU with an earlier kept one reaches ``dedup_iou``, and stops at ``max_masks``.
The ``sam2`` provider (:mod:`omnienc.pretext.masks.sam2`) is imported on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from omnienc.pretext.masks.classical import merge_masks, otsu_masks, slic_masks, watershed_masks
from omnienc.pretext.masks.config import MIN_EXTENT, MaskConfig, MaskProvider
from omnienc.pretext.masks.image import _interleave, body_mask

logger = logging.getLogger("omnienc")


def _sam2_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """``sam2``: SAM2 on seed slices, propagated (imported on first use: torch, transformers)."""
    from omnienc.pretext.masks.sam2 import sam2_masks

    return sam2_masks(image, body, config)


MASK_PROVIDERS: dict[str, MaskProvider] = {
    "merge": merge_masks,
    "otsu": otsu_masks,
    "watershed": watershed_masks,
    "slic": slic_masks,
    "sam2": _sam2_masks,
}


# --------------------------------------------------------------------------------------------
# Selection


_CROSS = ndi.generate_binary_structure(3, 1)


@dataclass
class _Box:
    """A mask as its bounding box and the cropped bool array (cheap IoU between masks)."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    crop: np.ndarray
    n: int

    @classmethod
    def of(cls, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> _Box | None:
        """The box of a non-empty ``mask`` whose first voxel sits at ``offset`` (else None)."""
        idx = [
            np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)
        ]
        if any(i.size == 0 for i in idx):
            return None
        start = [int(i[0]) for i in idx]
        stop = [int(i[-1]) + 1 for i in idx]
        crop = mask[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
        lo = (start[0] + offset[0], start[1] + offset[1], start[2] + offset[2])
        hi = (stop[0] + offset[0], stop[1] + offset[1], stop[2] + offset[2])
        return cls(lo, hi, crop, int(np.count_nonzero(crop)))

    def iou(self, other: _Box) -> float:
        lo = [max(a, b) for a, b in zip(self.lo, other.lo, strict=True)]
        hi = [min(a, b) for a, b in zip(self.hi, other.hi, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            return 0.0
        mine = self.crop[
            tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.lo, strict=True))
        ]
        theirs = other.crop[
            tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, other.lo, strict=True))
        ]
        inter = int(np.count_nonzero(mine & theirs))
        return inter / (self.n + other.n - inter)


def propose_masks(image: np.ndarray, config: MaskConfig | None = None) -> np.ndarray:
    """Class-agnostic mask proposals for one preprocessed volume.

    Runs every provider of ``config.providers`` on the image and its :func:`body_mask`; keeps
    masks with at least ``min_inside_body`` of their voxels in the body (clipped to it, then
    opened ``mask_opening_radius`` times with a 6-connected cross) and
    ``min_voxels <= size <= max_body_fraction * body``; interleaves the providers' ranked lists
    round-robin; greedily drops masks whose IoU with an earlier kept one is ``>= dedup_iou``; and
    stops at ``max_masks``. Deterministic: the same image and config give the same masks in the
    same order.

    Args:
        image: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) preprocessed float image.
        config: Parameters (default :class:`MaskConfig`).

    Returns:
        ``(K, X, Y, Z)`` bool with ``K <= config.max_masks``; ``K = 0`` for a constant image or
        one thinner than 4 voxels along an axis (the recursive Gaussian filters need 4).

    Raises:
        ValueError: ``image`` is not 3D (or a single channel of a 3D image), or not finite.
    """
    config = config or MaskConfig()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"propose_masks takes an (X, Y, Z) image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("propose_masks: the image has NaN or Inf voxels")
    if min(image.shape) < MIN_EXTENT:
        logger.debug(
            "no mask proposals for an image of shape %s (thinner than %d voxels)",
            image.shape,
            MIN_EXTENT,
        )
        return np.zeros((0, *image.shape), dtype=bool)
    body = body_mask(image, config.body_threshold, config.body_min_component)
    n_body = int(body.sum())
    if n_body == 0:
        return np.zeros((0, *image.shape), dtype=bool)
    ranked: list[list[_Box]] = []
    for name in config.providers:
        boxes = []
        for mask in MASK_PROVIDERS[name](image, body, config):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != image.shape:
                raise ValueError(
                    f"mask provider {name!r} returned shape {mask.shape} for image {image.shape}"
                )
            size = int(np.count_nonzero(mask))
            box = _Box.of(mask & body)
            if box is None or box.n < config.min_inside_body * size:
                continue
            if config.mask_opening_radius > 0:
                opened = ndi.binary_opening(box.crop, _CROSS, iterations=config.mask_opening_radius)
                box = _Box.of(opened, box.lo)
            if box is None or not config.min_voxels <= box.n <= config.max_body_fraction * n_body:
                continue
            boxes.append(box)
        ranked.append(boxes)
    kept: list[_Box] = []
    for box in _interleave(ranked):
        if all(box.iou(k) < config.dedup_iou for k in kept):
            kept.append(box)
            if len(kept) == config.max_masks:
                break
    out = np.zeros((len(kept), *image.shape), dtype=bool)
    for i, box in enumerate(kept):
        out[i, box.lo[0] : box.hi[0], box.lo[1] : box.hi[1], box.lo[2] : box.hi[2]] = box.crop
    return out
