"""The preprocessing an encoder was trained with, as a small recorded dataclass.

A checkpoint stores :class:`Preprocessing` as JSON so that every adapter feeds the frozen encoder
exactly what it saw in pretraining. The MONAI pipeline built from it lives in
:mod:`omnienc.transforms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omnienc.config import JsonConfig

# Modalities omnienc knows. PET, SPECT and ``unknown`` are normalised like MR (percentile clip +
# foreground z-score); only CT has its own rule (the HU window).
MODALITIES = ("CT", "MR", "PET", "SPECT", "unknown")


def _floats(name: str, values: Any, n: int) -> tuple[float, ...]:
    """``values`` as a tuple of ``n`` finite floats, or a ValueError naming ``name``."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {values!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {values!r}")
    return out


def _ints(name: str, values: Any, n: int) -> tuple[int, ...]:
    """``values`` as a tuple of ``n`` integers (integral floats allowed), or a ValueError."""
    floats = _floats(name, values, n)
    if any(v != int(v) for v in floats):
        raise ValueError(f"{name} must be {n} integers, got {values!r}")
    return tuple(int(v) for v in floats)


@dataclass(frozen=True)
class Preprocessing(JsonConfig):
    """Deterministic preprocessing applied before the encoder.

    Attributes:
        spacing: Target voxel size in mm (RAS axis order), or ``None`` to keep the native grid.
        ct_window: HU window ``(low, high)`` for CT; values are clipped to it and scaled to [0, 1].
        percentiles: Lower and upper percentile for MR/PET/SPECT/unknown: the volume is clipped to
            them, then z-scored with the statistics of the foreground (voxels above the lower
            clip value).
        crop_foreground: Crop to the bounding box of the body (voxels above the background level)
            before padding/cropping to ``spatial_size``.
        foreground_margin: Margin in voxels kept around the foreground box.
        spatial_size: Final ``(X, Y, Z)`` size by symmetric pad/centre crop, or ``None`` to keep
            the size after resampling and cropping.
    """

    config_name = "preprocessing"

    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    foreground_margin: int = 2
    spatial_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        # Normalise types so that equal configs serialise (and key caches) identically.
        if self.spacing is not None:
            spacing = _floats("spacing", self.spacing, 3)
            if min(spacing) <= 0:
                raise ValueError(f"spacing must be three positive numbers in mm, got {spacing}")
            object.__setattr__(self, "spacing", spacing)
        window = _floats("ct_window", self.ct_window, 2)
        if window[0] >= window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {window}")
        object.__setattr__(self, "ct_window", window)
        lo, hi = _floats("percentiles", self.percentiles, 2)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {(lo, hi)}")
        object.__setattr__(self, "percentiles", (lo, hi))
        if self.spatial_size is not None:
            size = _ints("spatial_size", self.spatial_size, 3)
            if min(size) < 1:
                raise ValueError(f"spatial_size must be three positive ints, got {size}")
            object.__setattr__(self, "spatial_size", size)
        (margin,) = _ints("foreground_margin", (self.foreground_margin,), 1)
        if margin < 0:
            raise ValueError(f"foreground_margin must be >= 0, got {margin}")
        object.__setattr__(self, "foreground_margin", margin)
