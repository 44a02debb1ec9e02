"""The few-shot benchmark's methods on prepared views, and how their masks are scored.

Every method returns a mask on the query view's encoder grid (or, for registration, directly on
the native grid); :func:`native_mask` takes maps onto the query's native grid the way
:func:`omnienc.pretext.segment.segment_fewshot` does (trilinear resampling, then the
threshold), and :func:`score` gives Dice and the diagnostics on that grid.

* :class:`EncoderMethods` holds one encoder (and its in-context head, if any). Its
  :meth:`~EncoderMethods.head_probabilities` is ``segment_fewshot``'s computation, split so that
  the work shared between supports and structures is done once: the query's windows are
  encoded once (:class:`~omnienc.adapters.segmentation.WindowFeatures`) and every support's
  reference features once; k supports average their probability maps. A test checks it against
  ``segment_fewshot`` itself. :meth:`~EncoderMethods.similarity` is the frozen-feature prototype
  matcher of :mod:`omnienc.adapters.segmentation.prototype` on the same windows (k supports
  average their prototypes).
* :func:`within_mm`: the atlas region of the atlas-localised diagnostics.
* :func:`intensity_mask`: the support structure's mean +- ``k`` SD of the preprocessed
  intensity, the query's largest connected component inside that window (k supports pool their
  voxels).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from omnienc.adapters.segmentation import (
    WindowFeatures,
    centred_crop,
    mean_prototypes,
    pool_prototypes,
)
from omnienc.adapters.segmentation import window_similarity as _similarity
from omnienc.encoders import Encoder
from omnienc.pretext.incontext import InContextHead
from omnienc.pretext.segment import resample_to_grid

_FAR = 1e6  # stands for an unbounded side of a box (coordinates are clamped to the grid)


def native_mask(
    values: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    threshold: float,
    order: int = 1,
) -> np.ndarray:
    """``resample_to_grid(values, ...) > threshold``, resampled only where it can be true.

    With linear (or nearest) interpolation a target voxel can exceed the threshold only when it
    maps next to a source voxel that does, so only the box of target voxels around the source
    voxels above the threshold is resampled (a side touching the source's edge stays open, as
    values beyond the edge repeat it). The result equals the full resampling.

    Args:
        values: ``(X, Y, Z)`` source map.
        affine: Its ``(4, 4)`` voxel-to-world matrix.
        shape: ``(X', Y', Z')`` of the target grid.
        target_affine: The target's ``(4, 4)`` voxel-to-world matrix.
        threshold: A voxel is in where the resampled value exceeds it.
        order: 1 trilinear, 0 nearest.

    Returns:
        ``(X', Y', Z')`` bool.
    """
    out = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    nz = np.nonzero(values > threshold)
    if not nz[0].size:
        return out
    lo = [-_FAR if a.min() == 0 else a.min() - 1.0 for a in nz]
    hi = [
        _FAR if a.max() == n - 1 else a.max() + 1.0 for a, n in zip(nz, values.shape, strict=True)
    ]
    to_target = np.linalg.inv(np.asarray(target_affine, np.float64)) @ np.asarray(
        affine, np.float64
    )
    corners = np.array([[*c, 1.0] for c in itertools.product(*zip(lo, hi, strict=True))])
    pts = (to_target @ corners.T)[:3]
    start = np.clip(np.floor(pts.min(axis=1)), 0, out.shape).astype(int)
    stop = np.clip(np.ceil(pts.max(axis=1)) + 1, 0, out.shape).astype(int)
    if np.any(stop <= start):
        return out
    shift = np.eye(4)
    shift[:3, 3] = start
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    sub = _resample(values, affine, stop - start, target_affine @ shift, order)
    out[box] = sub > threshold
    return out


def _resample(
    values: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    order: int,
) -> np.ndarray:
    """:func:`resample_to_grid`, one axis at a time when the grids' axes are parallel.

    Trilinear (and nearest) interpolation is separable: between two grids whose index map is
    diagonal it is three 1D interpolations, with the edge values repeated beyond the border as
    ``resample_to_grid`` does, at a fraction of the cost of scipy's general ``affine_transform``.
    """
    m = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    if not np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-9):
        return resample_to_grid(values, affine, shape, target_affine, order=order)
    out = np.asarray(values, np.float32)
    for axis in range(3):
        n = out.shape[axis]
        coord = np.clip(m[axis, axis] * np.arange(int(shape[axis])) + m[axis, 3], 0, n - 1)
        if order == 0:
            out = np.take(out, np.floor(coord + 0.5).astype(np.intp), axis=axis)  # as scipy
            continue
        lo = np.floor(coord).astype(np.intp)
        hi = np.minimum(lo + 1, n - 1)
        w = (coord - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        low = np.take(out, lo, axis=axis)
        high = np.take(out, hi, axis=axis)
        high -= low
        high *= w
        low += high
        out = low
    return out


def within_mm(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """The voxels within ``margin_mm`` of a mask (its Euclidean dilation in millimetres).

    The distance transform runs only on the mask's bounding box widened by the margin.

    Args:
        mask: ``(X, Y, Z)`` bool.
        spacing: ``(3,)`` voxel size in mm.
        margin_mm: Largest distance, >= 0.

    Returns:
        ``(X, Y, Z)`` bool, a superset of ``mask`` (empty for an empty mask).
    """
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    pad = np.ceil(margin_mm / np.asarray(spacing, np.float64)).astype(int)
    box = truth_box(mask, [int(v) for v in pad])
    dist = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
    out[box] = dist <= margin_mm
    return out


def truth_box(truth: np.ndarray, margin: Sequence[float]) -> tuple[slice, ...]:
    """The truth's bounding box widened by ``margin`` voxels per axis (see :func:`score`).

    Args:
        truth: ``(X, Y, Z)`` bool, not empty.
        margin: Voxels per axis.
    """
    nz = np.nonzero(truth)
    return tuple(
        slice(max(0, int(a.min() - m)), int(a.max() + m) + 1)
        for a, m in zip(nz, margin, strict=True)
    )


def score(pred: np.ndarray, truth: np.ndarray, box: tuple[slice, ...]) -> dict[str, Any]:
    """Dice and diagnostics of a predicted mask on the query's native grid.

    Args:
        pred: ``(X, Y, Z)`` bool prediction.
        truth: ``(X, Y, Z)`` bool truth.
        box: :func:`truth_box`: predicted voxels outside it count as ``far`` (a window there
            does not see the structure).

    Returns:
        ``{"dice", "precision" (None for an empty prediction), "recall", "pred_voxels",
        "far"}`` (``far``: the fraction of predicted voxels that are far, None if empty).
    """
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    tp = int(np.logical_and(pred, truth).sum())
    far = round(1.0 - int(pred[box].sum()) / n_pred, 4) if n_pred else None
    return {
        "dice": round(2.0 * tp / (n_pred + n_true), 4) if n_pred + n_true else 1.0,
        "precision": round(tp / n_pred, 4) if n_pred else None,
        "recall": round(tp / n_true, 4) if n_true else None,
        "pred_voxels": n_pred,
        "far": far,
    }


@dataclass
class Reference:
    """One support structure, prepared once for an encoder's methods.

    Attributes:
        feats: The reference crop's intermediates, ``(1, C_i, d_i, h_i, w_i)`` per scale.
        mask: ``(1, 1, S_x, S_y, S_z)`` float32 mask on the crop.
        prototypes: ``(C_i,)`` per scale (:func:`~omnienc.adapters.segmentation.pool_prototypes`).
        threshold: The prototype threshold chosen on the support itself (set later).
    """

    feats: list[torch.Tensor]
    mask: torch.Tensor
    prototypes: list[torch.Tensor]
    threshold: float | None = None


class EncoderMethods:
    """One encoder and, if it has one, its in-context head, for the encoder-based methods.

    Args:
        encoder: The encoder (set to eval mode).
        head: Its in-context head, or ``None`` (only the prototype matcher runs).
        crop_size: Reference crop and window size ``(S_x, S_y, S_z)``.
        overlap: Sliding-window overlap, in ``[0, 1)``.
        batch_size: Windows per encoder call.
    """

    def __init__(
        self,
        encoder: Encoder,
        head: InContextHead | None,
        crop_size: Sequence[int],
        overlap: float = 0.5,
        batch_size: int = 4,
    ) -> None:
        self.encoder = encoder.eval()
        self.head = head.eval() if head is not None else None
        self.crop_size = tuple(int(s) for s in crop_size)
        self.overlap = overlap
        self.batch_size = batch_size

    def windows(self, image: np.ndarray) -> WindowFeatures:
        """Encode every sliding window of a query view's ``(x, y, z)`` image once."""
        return WindowFeatures(self.encoder, image, self.crop_size, self.overlap, self.batch_size)

    def reference(self, image: np.ndarray, mask: np.ndarray) -> Reference:
        """The reference crop of a support (``(x, y, z)`` image and non-empty bool mask)."""
        crop, crop_mask = centred_crop(image, mask, self.crop_size)
        with torch.inference_mode():
            feats = self.encoder.forward_intermediates(torch.from_numpy(crop)[None, None])
        mask_t = torch.from_numpy(crop_mask)[None, None]
        return Reference(feats, mask_t, pool_prototypes(feats, mask_t))

    def head_probabilities(self, windows: WindowFeatures, refs: Sequence[Reference]) -> np.ndarray:
        """The head's foreground probability on the query view, averaged over the supports.

        Returns:
            ``(x, y, z)`` float32 in [0, 1] on the view's encoder grid.
        """
        head = self.head
        if head is None:
            raise ValueError("this encoder has no in-context head")
        total = None
        for ref in refs:

            def predict(feats: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
                n = feats[0].shape[0]
                logits = head(
                    [f.expand(n, -1, -1, -1, -1) for f in ref.feats],  # noqa: B023
                    ref.mask.expand(n, -1, -1, -1, -1),  # noqa: B023
                    feats,
                    size,
                )
                return torch.sigmoid(logits.float())

            prob = windows.blend(predict)[0]
            total = prob if total is None else total + prob
        assert total is not None
        return total / len(refs)

    def similarity(
        self, windows: WindowFeatures, supports: Sequence[Sequence[Reference]]
    ) -> np.ndarray:
        """Cosine similarity to each support set's mean prototype, in one sweep of the query.

        Args:
            windows: The query view's windows.
            supports: ``P`` support sets (each a list of references, averaged).

        Returns:
            ``(P, x, y, z)`` float32 in [-1, 1] on the view's encoder grid.
        """
        sets = [mean_prototypes([r.prototypes for r in refs]) for refs in supports]
        protos = [torch.stack(list(scale)) for scale in zip(*sets, strict=True)]  # (P, C_i)
        return windows.blend(lambda feats, size: _similarity(feats, protos, size))


def intensity_mask(
    supports: Sequence[tuple[np.ndarray, np.ndarray]], query: np.ndarray, k: float = 1.5
) -> np.ndarray:
    """The no-learning baseline: the supports' intensity window, largest component in the query.

    Args:
        supports: ``(image, mask)`` of each support on its encoder grid (``(x, y, z)``
            preprocessed intensities and bool).
        query: ``(x', y', z')`` preprocessed query view.
        k: Half-width of the window in standard deviations.

    Returns:
        ``(x', y', z')`` bool on the query view's encoder grid.
    """
    values = np.concatenate([img[mask] for img, mask in supports])
    mu, sigma = float(values.mean()), float(values.std())
    candidates = np.abs(query - mu) <= k * max(sigma, 1e-3)
    labels, n = ndimage.label(candidates)
    if n == 0:
        return np.zeros(query.shape, bool)
    sizes = ndimage.sum(candidates, labels, index=np.arange(1, n + 1))
    return np.asarray(labels == 1 + int(np.argmax(sizes)))
