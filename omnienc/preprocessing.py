"""The preprocessing an encoder was trained with, as a small recorded dataclass.

A checkpoint stores :class:`Preprocessing` as JSON so that every adapter feeds the frozen encoder
exactly what it saw in pretraining. The MONAI pipeline built from it lives in
:mod:`omnienc.transforms`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Modalities omnienc knows. ``unknown`` is normalised like MR (percentile clip + z-score).
MODALITIES = ("CT", "MR", "PET", "unknown")


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic preprocessing applied before the encoder.

    Attributes:
        spacing: Target voxel size in mm (RAS axis order), or ``None`` to keep the native grid.
        ct_window: HU window ``(low, high)`` for CT; values are clipped to it and scaled to [0, 1].
        percentiles: Lower and upper percentile for MR/PET/unknown: the volume is clipped to
            them, then z-scored over the foreground (non-zero voxels after clipping).
        crop_foreground: Crop to the bounding box of the body (voxels above the background level)
            before padding/cropping to ``spatial_size``.
        foreground_margin: Margin in voxels kept around the foreground box.
        spatial_size: Final ``(X, Y, Z)`` size by symmetric pad/centre crop, or ``None`` to keep
            the size after resampling and cropping.
    """

    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    foreground_margin: int = 2
    spatial_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three positive numbers in mm, got {self.spacing}")
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )
        if self.spatial_size is not None and (
            len(self.spatial_size) != 3 or min(self.spatial_size) < 1
        ):
            raise ValueError(f"spatial_size must be three positive ints, got {self.spatial_size}")
        if self.foreground_margin < 0:
            raise ValueError(f"foreground_margin must be >= 0, got {self.foreground_margin}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Raises:
            ValueError: A key is unknown or a value is invalid.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}"
            )
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)
