""":class:`MaskConfig`: the parameters of the mask proposals, every one of them in the cache key.

A provider is any function ``(image, body, config) -> list[np.ndarray]`` (:data:`MaskProvider`)
returning boolean ``(X, Y, Z)`` masks, best first, at most ``config.max_masks`` of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnienc.config import JsonConfig

MASK_CACHE_VERSION = 1

# SimpleITK's recursive Gaussian filters need at least this many voxels along every axis.
MIN_EXTENT = 4

MaskProvider = Callable[[np.ndarray, np.ndarray, "MaskConfig"], list[np.ndarray]]


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}") from None
    if not out or min(out) < 1 or any(float(v) != int(v) for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return out


def _positive_floats(name: str, values: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of positive numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {values!r}")
    return out


@dataclass(frozen=True)
class MaskConfig(JsonConfig):
    """Parameters of the mask proposals (every one of them enters the cache key).

    Sizes are in voxels of the preprocessed grid (2 mm isotropic by default: 1,000 voxels are
    8 cm^3).

    Attributes:
        providers: Names in :data:`MASK_PROVIDERS`, in priority order (ties of the round-robin).
        body_threshold: Body mask: voxels above ``min + body_threshold * (p99 - min)``.
        body_min_component: Keep body components of at least this fraction of the largest one.
        smoothing_sigma: Gaussian smoothing (voxels) before intensity-driven steps.
        gradient_sigma: Gaussian scale (voxels) of the gradient magnitude.
        merge_level: Flooding level of the fine watershed that ``merge`` starts from, as a
            fraction of the 99th percentile of the gradient magnitude in the body.
        merge_shrink: ``merge`` and ``watershed`` flood at ``1 / shrink`` resolution (1 = full);
            ITK's morphological watershed takes about 6 s on a 128^3 volume at full resolution.
        merge_size_power: ``p`` of the size weight ``(n_a n_b / (n_a + n_b)) ** p``; 0 merges by
            dissimilarity alone (chains), 0.5 orders merges like Ward's linkage.
        merge_edge_weight: Share of the boundary gradient (vs. the difference of mean
            intensity) in the dissimilarity of two adjacent regions.
        merge_regions: ``merge`` proposes the regions of the partitions with these many regions.
        otsu_thresholds: Number of Otsu thresholds (classes minus one) for each ``otsu`` run.
        otsu_opening_radius: Radius (voxels) of the opening that cuts thin bridges before the
            connected components of each class (0: none).
        watershed_levels: Flooding levels of ``watershed`` (fractions of the gradient p99).
        slic_grid_sizes: Supervoxel grid sizes (voxels) of ``slic``.
        slic_spatial_weight: SLIC's spatial proximity weight (intensities are equalised to
            [0, 1]; smaller values follow intensity edges more closely).
        slic_iterations: SLIC iterations.
        mask_opening_radius: Every proposal is opened with a 6-connected cross this many times
            (cuts one-voxel leaks into neighbours; 0: never).
        min_voxels: Smallest proposal (voxels).
        max_body_fraction: Largest proposal, as a fraction of the body's voxels.
        min_inside_body: A proposal needs at least this fraction of its voxels inside the body
            (it is then clipped to the body).
        dedup_iou: Drop a proposal whose 3D IoU with an already kept one is at least this.
        max_masks: At most this many proposals per volume.
        sam2: Checkpoint of the ``sam2`` provider (:mod:`omnienc.pretext.masks.sam2`): a local
            folder or a hub id such as ``facebook/sam2.1-hiera-tiny``; unused by the others.
    """

    config_name = "mask config"

    providers: tuple[str, ...] = ("merge",)
    body_threshold: float = 0.05
    body_min_component: float = 0.1
    smoothing_sigma: float = 0.7
    gradient_sigma: float = 1.0
    merge_level: float = 0.02
    merge_shrink: int = 2
    merge_size_power: float = 0.3
    merge_edge_weight: float = 0.5
    merge_regions: tuple[int, ...] = (48,)
    otsu_thresholds: tuple[int, ...] = (3,)
    otsu_opening_radius: int = 1
    watershed_levels: tuple[float, ...] = (0.05, 0.1)
    slic_grid_sizes: tuple[int, ...] = (12, 20)
    slic_spatial_weight: float = 0.1
    slic_iterations: int = 3
    mask_opening_radius: int = 1
    min_voxels: int = 300
    max_body_fraction: float = 0.5
    min_inside_body: float = 0.9
    dedup_iou: float = 0.8
    max_masks: int = 48
    sam2: str = ""

    def __post_init__(self) -> None:
        # The dict's module imports this one (providers take a MaskConfig): look it up here.
        from omnienc.pretext.masks.providers import MASK_PROVIDERS

        if isinstance(self.providers, str):
            raise ValueError(f"providers must be a list of names, got {self.providers!r}")
        providers = tuple(str(p) for p in self.providers)
        if not providers:
            raise ValueError("providers must name at least one mask provider")
        unknown = [p for p in providers if p not in MASK_PROVIDERS]
        if unknown:
            raise ValueError(
                f"unknown mask providers {unknown}; known: {sorted(MASK_PROVIDERS)} "
                "(add yours to omnienc.pretext.masks.MASK_PROVIDERS first)"
            )
        object.__setattr__(self, "providers", providers)
        for name in ("merge_regions", "otsu_thresholds", "slic_grid_sizes"):
            object.__setattr__(self, name, _positive_ints(name, getattr(self, name)))
        object.__setattr__(
            self, "watershed_levels", _positive_floats("watershed_levels", self.watershed_levels)
        )
        for name in ("merge_shrink", "slic_iterations", "min_voxels", "max_masks"):
            object.__setattr__(self, name, _positive_ints(name, (getattr(self, name),))[0])
        for name in ("otsu_opening_radius", "mask_opening_radius"):
            (radius,) = _positive_ints(name, (getattr(self, name) + 1,))
            object.__setattr__(self, name, radius - 1)
        for name, lo, hi in (
            ("body_threshold", 0.0, 1.0),
            ("body_min_component", 0.0, 1.0),
            ("merge_size_power", 0.0, 2.0),
            ("merge_edge_weight", 0.0, 1.0),
            ("max_body_fraction", 0.0, 1.0),
            ("min_inside_body", 0.0, 1.0),
            ("dedup_iou", 0.0, 1.0),
        ):
            value = float(getattr(self, name))
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
            object.__setattr__(self, name, value)
        for name in ("smoothing_sigma", "gradient_sigma", "merge_level", "slic_spatial_weight"):
            object.__setattr__(self, name, _positive_floats(name, (getattr(self, name),))[0])

    def digest(self) -> str:
        """A short hash of the parameters (and the cache format version)."""
        params = self.to_dict()
        if "sam2" not in self.providers:  # the checkpoint only matters to the sam2 provider,
            params.pop("sam2", None)  # and caches made before it existed stay valid
        payload = json.dumps({"version": MASK_CACHE_VERSION, **params}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()
