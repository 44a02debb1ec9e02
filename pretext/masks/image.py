"""What every mask provider sees: the body mask and the image equalised within it.

Providers work on the preprocessed image ``(X, Y, Z)`` float32 and its body mask
(:func:`body_mask`) in voxel units. Intensity-driven steps run on the image *equalised within
the body* (:func:`equalize`: each voxel replaced by its intensity rank among body voxels), which
stretches the narrow soft-tissue range of CT and makes z-scored MR look alike to the providers.
Also here: the SimpleITK conversions and the round-robin interleave of ranked lists that the
providers share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Image helpers. SimpleITK indexes (x, y, z) but its arrays are (z, y, x): transpose on the way.


def _to_sitk(array: np.ndarray) -> sitk.Image:
    """``(X, Y, Z)`` array -> SimpleITK image with unit spacing (voxel units)."""
    return sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))


def _from_sitk(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> ``(X, Y, Z)`` array."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _p99_range(image: np.ndarray) -> tuple[float, float]:
    flat = image.reshape(-1)[:: max(1, image.size // 1_000_000)]
    return float(flat.min()), float(np.percentile(flat, 99))


def body_mask(image: np.ndarray, threshold: float = 0.05, min_component: float = 0.1) -> np.ndarray:
    """The body: the large components above the background level, with their holes filled.

    After omnienc's normalisation the background (air, empty space) sits at the image minimum.
    Voxels above ``min + threshold * (p99 - min)`` are opened with a radius-1 ball (which detaches
    thin things such as a CT table's edge), the components of at least ``min_component`` times the
    largest one are kept, and holes are filled in 3D and then slice by slice along the last axis
    (so that lungs and bowel gas open to the crop border are filled too).

    Args:
        image: ``(X, Y, Z)`` preprocessed image.
        threshold: Fraction of the ``(min, p99)`` range above the minimum.
        min_component: Keep components of at least this fraction of the largest.

    Returns:
        ``(X, Y, Z)`` bool; all False for a constant image.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, p99 = _p99_range(image)
    if not p99 > lo:
        return np.zeros(image.shape, dtype=bool)
    above = image > lo + threshold * (p99 - lo)
    opened = _from_sitk(sitk.BinaryMorphologicalOpening(_to_sitk(above.astype(np.uint8)), [1] * 3))
    labels, n = ndi.label(opened > 0)
    if n == 0:
        labels, n = ndi.label(above)
        if n == 0:
            return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(labels.reshape(-1))[1:]
    keep = np.flatnonzero(sizes >= min_component * sizes.max()) + 1
    mask = np.isin(labels, keep)
    mask = ndi.binary_fill_holes(mask)
    # Background connected in-plane only: fills holes of every axial slice.
    return ndi.binary_fill_holes(mask, structure=ndi.generate_binary_structure(2, 1)[:, :, None])


def equalize(image: np.ndarray, body: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation within the body: each voxel becomes its intensity rank in [0, 1].

    Args:
        image: ``(X, Y, Z)`` float image.
        body: ``(X, Y, Z)`` bool.
        bins: Number of quantiles of the piecewise-linear rank map.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1]; 0 outside the body.
    """
    values = image[body]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1))
    out = np.interp(image, quantiles, np.linspace(0.0, 1.0, bins + 1)).astype(np.float32)
    out[~body] = 0.0
    return out


def _interleave(lists: Sequence[Sequence[_T]]) -> list[_T]:
    """Round-robin merge of ranked lists: first of each, then second of each, ..."""
    out: list[_T] = []
    for rank in range(max((len(x) for x in lists), default=0)):
        out.extend(x[rank] for x in lists if rank < len(x))
    return out
