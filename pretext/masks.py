"""Class-agnostic 3D mask proposals for the in-context pretext, with an on-disk cache.

MASS (Gao et al., CVPR 2026, https://arxiv.org/abs/2603.13660) pretrains by in-context
segmentation of class-agnostic masks that SAM2 proposes on a GPU. Here the proposals come from
classical 3D image analysis in SimpleITK, NumPy and SciPy: no model weights, no GPU.

Every provider sees the preprocessed image ``(X, Y, Z)`` float32 and its body mask
``(X, Y, Z)`` bool, and works in voxel units (the preprocessed grid is isotropic by default).
Intensity-driven steps run on the image *equalised within the body* (each voxel replaced by its
intensity rank among body voxels), which stretches the narrow soft-tissue range of CT and makes
z-scored MR look alike to the providers. Providers, in :data:`MASK_PROVIDERS`:

``merge``
    Region merging: a fine watershed of the gradient magnitude (computed at half resolution for
    speed) is merged greedily by a size-weighted dissimilarity of adjacent regions (boundary
    gradient and difference of mean intensity, weighted by ``(n_a n_b / (n_a + n_b)) ** p`` as in
    Ward's linkage), and the partitions with ``merge_regions`` regions are the proposals.
``otsu``
    Multi-level Otsu thresholds of the smoothed intensities inside the body, each class opened
    (to cut thin bridges) and split into connected components.
``watershed``
    ``sitk.MorphologicalWatershed`` of the gradient magnitude at a few flooding levels.
``slic``
    3D SLIC supervoxels (``sitk.SLICImageFilter``) at a few grid sizes.

:func:`propose_masks` runs the providers named in :class:`MaskConfig`, keeps masks that lie
mostly inside the body (clipped to it, then opened to cut one-voxel leaks) and whose size is
within bounds, interleaves the
providers' ranked lists round-robin (rank within its provider is the score), drops every mask
whose 3D IoU with an earlier kept one reaches ``dedup_iou``, and stops at ``max_masks``.

**Plugging in a SAM-style provider.** A provider is any function with the signature
``(image, body, config) -> list[np.ndarray]`` returning boolean ``(X, Y, Z)`` masks, best first,
at most ``config.max_masks`` of them. For example a SAM2 provider would run the automatic mask
generator on axial slices and propagate the masks through the volume, then::

    from omnienc.pretext.masks import MASK_PROVIDERS, MaskConfig
    MASK_PROVIDERS["sam2"] = sam2_masks          # plain dict, no registry decorator
    config = MaskConfig(providers=("sam2", "merge"))

Its own parameters (checkpoint, thresholds) belong to the function or a closure; only its name
enters the cache key, so give it a new name when they change.

Proposals are cached per volume (:func:`compute_folder_masks`): bit-packed masks in an ``.npz``
named after the preprocessed volume's cache key and a digest of the :class:`MaskConfig`, written
atomically; a damaged entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from omnienc.atomic import atomic_target
from omnienc.config import JsonConfig
from omnienc.data.folder import ManifestEntry, VolumeFolder
from omnienc.errors import DataError

logger = logging.getLogger("omnienc")

MASK_CACHE_VERSION = 1

# SimpleITK's recursive Gaussian filters need at least this many voxels along every axis.
MIN_EXTENT = 4

_T = TypeVar("_T")

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
        sam2: Checkpoint of the ``sam2`` provider (:mod:`omnienc.pretext.masks_sam2`): a local
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


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return _from_sitk(sitk.SmoothingRecursiveGaussian(_to_sitk(image.astype(np.float32)), sigma))


def _gradient(image: np.ndarray, body: np.ndarray, sigma: float) -> tuple[sitk.Image, float]:
    """Gradient magnitude (voxel units) as a SimpleITK image, and its body 99th percentile."""
    grad = sitk.GradientMagnitudeRecursiveGaussian(_to_sitk(image.astype(np.float32)), sigma)
    values = _from_sitk(grad)[body]
    p99 = float(np.percentile(values, 99)) if values.size else 0.0
    return grad, p99


def _watershed(grad: sitk.Image, level: float, shrink: int) -> np.ndarray:
    """Watershed basins of ``grad`` flooded to ``level``, computed at ``1 / shrink`` resolution.

    Returns:
        ``(X, Y, Z)`` int64 labels on ``grad``'s grid (nearest-neighbour upsampling).
    """
    if min(grad.GetSize()) < 4 * shrink:  # too thin to flood at lower resolution
        shrink = 1
    small = sitk.BinShrink(grad, [shrink] * 3) if shrink > 1 else grad
    basins = sitk.MorphologicalWatershed(
        small, level=level, markWatershedLine=False, fullyConnected=False
    )
    if shrink > 1:
        basins = sitk.Resample(basins, grad, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return _from_sitk(basins).astype(np.int64)


def _label_masks(
    labels: np.ndarray, body: np.ndarray, config: MaskConfig, skip: int | None = None
) -> list[np.ndarray]:
    """Masks of the labels of ``labels`` inside the body, largest first (ties: smaller label).

    Only labels whose body part has a size within ``[min_voxels, max_body_fraction * body]`` are
    returned, at most ``config.max_masks`` of them; ``skip`` is a label that is never a mask.
    """
    flat = labels[body]
    if flat.size == 0:
        return []
    offset = int(flat.min())
    sizes = np.bincount(flat - offset)
    ok = (sizes >= config.min_voxels) & (sizes <= config.max_body_fraction * flat.size)
    if skip is not None and 0 <= skip - offset < ok.size:
        ok[skip - offset] = False
    ids = np.flatnonzero(ok)
    ids = ids[np.argsort(-sizes[ids], kind="stable")][: config.max_masks] + offset
    return [(labels == i) & body for i in ids]


def _interleave(lists: Sequence[Sequence[_T]]) -> list[_T]:
    """Round-robin merge of ranked lists: first of each, then second of each, ..."""
    out: list[_T] = []
    for rank in range(max((len(x) for x in lists), default=0)):
        out.extend(x[rank] for x in lists if rank < len(x))
    return out


# --------------------------------------------------------------------------------------------
# Providers: (image (X, Y, Z) float32, body (X, Y, Z) bool, config) -> [bool (X, Y, Z)], best first


def slic_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """3D SLIC supervoxels (``sitk.SLICImageFilter``) at each of ``config.slic_grid_sizes``.

    Returns:
        Supervoxels inside the body, interleaved across grid sizes, larger first.
    """
    if not body.any():
        return []
    source = _to_sitk(_smooth(equalize(image, body), config.smoothing_sigma))
    per_scale = []
    for grid in config.slic_grid_sizes:
        slic = sitk.SLICImageFilter()
        slic.SetSuperGridSize([grid] * 3)
        slic.SetSpatialProximityWeight(config.slic_spatial_weight)
        slic.SetMaximumNumberOfIterations(config.slic_iterations)
        labels = _from_sitk(slic.Execute(source)).astype(np.int64)
        per_scale.append(_label_masks(labels, body, config))
    return _interleave(per_scale)[: config.max_masks]


def otsu_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """Multi-level Otsu classes of the body, opened and split into connected components.

    The thresholds come from the histogram of the smoothed body voxels only
    (``sitk.OtsuMultipleThresholds``), so that the background does not claim a class.

    Returns:
        Components of every class and every ``config.otsu_thresholds``, larger first.
    """
    values = _smooth(image, config.smoothing_sigma)
    inside = values[body].astype(np.float32)
    if inside.size == 0 or float(inside.min()) == float(inside.max()):
        return []
    lists = []
    for n in config.otsu_thresholds:
        otsu = sitk.OtsuMultipleThresholdsImageFilter()
        otsu.SetNumberOfThresholds(n)
        otsu.SetNumberOfHistogramBins(128)
        otsu.Execute(sitk.GetImageFromArray(inside[None, None, :]))
        classes = np.digitize(values, np.asarray(otsu.GetThresholds(), dtype=np.float64))
        components: list[tuple[int, int, np.ndarray]] = []
        for c in range(n + 1):
            member = _to_sitk(((classes == c) & body).astype(np.uint8))
            if config.otsu_opening_radius > 0:
                member = sitk.BinaryMorphologicalOpening(member, [config.otsu_opening_radius] * 3)
            labels = _from_sitk(sitk.ConnectedComponent(member, False)).astype(np.int64)
            for k, mask in enumerate(_label_masks(labels, body, config, skip=0)):
                components.append((-int(mask.sum()), c * 100_000 + k, mask))
        components.sort(key=lambda t: (t[0], t[1]))
        lists.append([m for _, _, m in components])
    return _interleave(lists)[: config.max_masks]


def watershed_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """Basins of ``sitk.MorphologicalWatershed`` on the gradient magnitude, at each level.

    Returns:
        Basins inside the body, interleaved across ``config.watershed_levels``, larger first.
    """
    if not body.any():
        return []
    grad, p99 = _gradient(equalize(image, body), body, config.gradient_sigma)
    if p99 <= 0:
        return []
    per_level = [
        _label_masks(_watershed(grad, level * p99, config.merge_shrink), body, config)
        for level in config.watershed_levels
    ]
    return _interleave(per_level)[: config.max_masks]


def _adjacency(
    labels: np.ndarray, grad: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Face adjacency of a label map.

    Args:
        labels: ``(X, Y, Z)`` int64 in ``[-1, N)``; -1 is outside (never adjacent).
        grad: ``(X, Y, Z)`` gradient magnitude; a face's gradient is the mean of its two voxels.

    Returns:
        ``(a, b, faces, gradient_sum)``, each ``(E,)``: the adjacent pairs ``a < b``, how many
        voxel faces they share, and the summed gradient over those faces.
    """
    n = int(labels.max()) + 1
    lo_parts, hi_parts, g_parts = [], [], []
    for axis in range(3):
        lab = np.moveaxis(labels, axis, 0)
        g = np.moveaxis(grad, axis, 0)
        a, b = lab[:-1].reshape(-1), lab[1:].reshape(-1)
        face = (a != b) & (a >= 0) & (b >= 0)
        lo_parts.append(np.minimum(a[face], b[face]))
        hi_parts.append(np.maximum(a[face], b[face]))
        g_parts.append(0.5 * (g[:-1].reshape(-1)[face] + g[1:].reshape(-1)[face]))
    key = np.concatenate(lo_parts) * n + np.concatenate(hi_parts)
    pairs, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    gsum = np.bincount(inverse, weights=np.concatenate(g_parts), minlength=pairs.size)
    return pairs // n, pairs % n, counts.astype(np.float64), gsum


def merge_partitions(
    regions: np.ndarray,
    values: np.ndarray,
    grad: np.ndarray,
    counts: Sequence[int],
    size_power: float,
    edge_weight: float,
) -> dict[int, np.ndarray]:
    """Greedy merging of adjacent regions; the partitions met on the way with ``counts`` regions.

    The dissimilarity of adjacent regions ``a`` and ``b`` is
    ``((1 - w) |mean_a - mean_b| + w * boundary_gradient) * (n_a n_b / (n_a + n_b)) ** p``
    (``w = edge_weight``, ``p = size_power``; ``boundary_gradient`` is the mean of ``grad`` over
    their shared faces). The most similar pair is merged first, and every merge updates the
    neighbours' dissimilarities (a heap with lazy deletion).

    Args:
        regions: ``(X, Y, Z)`` int64 in ``[-1, N)``; -1 is outside.
        values: ``(X, Y, Z)`` intensities (means of regions).
        grad: ``(X, Y, Z)`` normalised gradient magnitude.
        counts: Region counts to report. Merging never joins regions that do not touch, so a
            count below the number of connected components yields the coarsest partition.
        size_power: ``p``.
        edge_weight: ``w``.

    Returns:
        ``{count: (N,) int64}`` mapping each initial region to its region id in the partition
        with ``count`` regions (or the coarsest reachable one).
    """
    n = int(regions.max()) + 1
    if n <= 0:
        return {c: np.zeros(0, dtype=np.int64) for c in counts}
    inside = regions >= 0
    flat = regions[inside]
    size = np.bincount(flat, minlength=n).astype(np.float64).tolist()
    total = np.bincount(flat, weights=values[inside].astype(np.float64), minlength=n).tolist()
    a_ids, b_ids, faces, gsum = _adjacency(regions, grad)
    neighbours: list[dict[int, tuple[float, float]]] = [{} for _ in range(n)]
    for a, b, f, g in zip(
        a_ids.tolist(), b_ids.tolist(), faces.tolist(), gsum.tolist(), strict=True
    ):
        neighbours[a][b] = (f, g)
        neighbours[b][a] = (f, g)
    w = edge_weight

    def cost(a: int, b: int, face: tuple[float, float]) -> float:
        na, nb = size[a], size[b]
        d = (1 - w) * abs(total[a] / na - total[b] / nb) + w * face[1] / face[0]
        return d * (na * nb / (na + nb)) ** size_power

    heap = [(cost(a, b, f), a, b) for a in range(n) for b, f in neighbours[a].items() if a < b]
    heapq.heapify(heap)
    parent = list(range(n))  # union-find over node ids; merged nodes get new ids

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    alive = [True] * n
    n_alive = n
    wanted = sorted(set(counts), reverse=True)
    out: dict[int, np.ndarray] = {}

    def snapshot() -> np.ndarray:
        return np.array([find(i) for i in range(n)], dtype=np.int64)

    while wanted and wanted[0] >= n_alive:
        out[wanted.pop(0)] = snapshot()
    while heap and wanted:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue
        new = len(size)
        size.append(size[a] + size[b])
        total.append(total[a] + total[b])
        parent.append(new)
        parent[a] = parent[b] = new
        alive[a] = alive[b] = False
        alive.append(True)
        merged: dict[int, tuple[float, float]] = {}
        for x in (a, b):
            for y, f in neighbours[x].items():
                if y == a or y == b:
                    continue
                old = merged.get(y)
                merged[y] = f if old is None else (old[0] + f[0], old[1] + f[1])
                del neighbours[y][x]
            neighbours[x] = {}
        neighbours.append(merged)
        for y, f in merged.items():
            neighbours[y][new] = f
            heapq.heappush(heap, (cost(new, y, f), min(new, y), max(new, y)))
        n_alive -= 1
        while wanted and wanted[0] >= n_alive:
            out[wanted.pop(0)] = snapshot()
    final = snapshot()
    for c in wanted:  # fewer regions than components: the coarsest partition reached
        out[c] = final
    return out


def merge_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """Regions of hierarchical region merging, at each of ``config.merge_regions`` regions.

    A watershed of the gradient magnitude flooded to ``merge_level`` over-segments the body
    (thousands of regions that follow intensity edges); :func:`merge_partitions` merges them.

    Returns:
        The regions of every requested partition, interleaved across partitions, larger first.
    """
    if not body.any():
        return []
    eq = equalize(image, body)
    grad_image, p99 = _gradient(eq, body, config.gradient_sigma)
    if p99 <= 0:
        return []
    basins = _watershed(grad_image, config.merge_level * p99, config.merge_shrink)
    # Basins that reach into the body, renumbered 0..N-1; -1 outside the body.
    present = np.bincount(basins[body]) > 0
    lut = np.where(present, np.cumsum(present) - 1, -1)
    regions = np.where(body, lut[np.where(body, basins, 0)], -1)
    grad = _from_sitk(grad_image) / p99
    partitions = merge_partitions(
        regions,
        _smooth(eq, config.smoothing_sigma),
        grad,
        config.merge_regions,
        config.merge_size_power,
        config.merge_edge_weight,
    )
    per_count = []
    for count in config.merge_regions:
        labels = np.where(regions >= 0, partitions[count][np.maximum(regions, 0)], -1)
        per_count.append(_label_masks(labels, body, config))
    return _interleave(per_count)[: config.max_masks]


def _sam2_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """``sam2``: SAM2 on seed slices, propagated (imported on first use: torch, transformers)."""
    from omnienc.pretext.masks_sam2 import sam2_masks

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


# --------------------------------------------------------------------------------------------
# Cache


@dataclass
class MaskResult:
    """What :func:`compute_folder_masks` did for one volume.

    Attributes:
        source: The volume (as in the folder's manifest).
        n_masks: Number of proposals ``K``.
        seconds: Wall time spent on this volume in this call (loading, when cached).
        cache_file: The ``.npz`` holding the proposals (read it with :func:`load_masks`).
        cached: Whether the proposals came from the cache.
    """

    source: str
    n_masks: int
    seconds: float
    cache_file: str
    cached: bool


def mask_cache_path(entry: ManifestEntry, config: MaskConfig, cache_dir: str | Path) -> Path:
    """Where the proposals of one folder entry are cached.

    The name joins the preprocessed volume's cache key (the stem of ``entry.cache_file``, which
    covers file content and preprocessing) and :meth:`MaskConfig.digest`.
    """
    return Path(cache_dir) / f"{Path(entry.cache_file).stem}-masks-{config.digest()}.npz"


def save_masks(path: str | Path, masks: np.ndarray, config: MaskConfig, source: str = "") -> Path:
    """Write ``(K, X, Y, Z)`` bool masks bit-packed (``np.packbits``) to ``path``, atomically."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (K, X, Y, Z), got shape {masks.shape}")
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        packed=np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1),
        shape=np.asarray(masks.shape, dtype=np.int64),
        config=np.array(json.dumps(config.to_dict(), sort_keys=True)),
        source=np.array(source),
    )
    with atomic_target(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def load_masks(cache_file: str | Path) -> np.ndarray:
    """Read proposals written by :func:`save_masks` / :func:`compute_folder_masks`.

    Returns:
        ``(K, X, Y, Z)`` bool.

    Raises:
        DataError: The file is missing, damaged, or not a mask cache entry.
    """
    path = Path(cache_file)
    try:
        with np.load(path, allow_pickle=False) as z:
            shape = tuple(int(s) for s in z["shape"])
            packed = z["packed"]
        if len(shape) != 4 or packed.shape[0] != shape[0]:
            raise ValueError(f"packed masks {packed.shape} do not match shape {shape}")
        voxels = shape[1] * shape[2] * shape[3]
        if packed.shape[1] != (voxels + 7) // 8:
            raise ValueError(f"packed masks {packed.shape} do not match shape {shape}")
        bits = np.unpackbits(packed, axis=1, count=voxels)
        return bits.astype(bool).reshape(shape)
    except FileNotFoundError:
        raise DataError(path, "no such mask cache file") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(path, f"damaged mask cache file ({type(exc).__name__}: {exc})") from None


def _read_image(cache_file: str) -> np.ndarray:
    """The preprocessed ``(X, Y, Z)`` image of a :class:`VolumeFolder` cache entry."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            image = z["image"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(cache_file, f"cannot read the preprocessed volume ({exc})") from None
    return image[0]


def _masks_for_volume(
    source: str, image_file: str, out: str, config_dict: dict[str, Any]
) -> MaskResult:
    """Serve one volume's proposals from the cache, or compute and cache them."""
    start = time.perf_counter()
    config = MaskConfig.from_dict(config_dict)
    path = Path(out)
    image = _read_image(image_file)
    if path.exists():
        try:
            masks = load_masks(path)
            if masks.shape[1:] != image.shape:
                raise DataError(path, f"mask grid {masks.shape[1:]} differs from {image.shape}")
            return MaskResult(source, len(masks), time.perf_counter() - start, out, True)
        except DataError as exc:
            logger.warning("corrupt mask cache entry %s (%s); regenerating it", path, exc.problem)
    masks = propose_masks(image, config)
    save_masks(path, masks, config, source)
    return MaskResult(source, len(masks), time.perf_counter() - start, out, False)


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def compute_folder_masks(
    folder: VolumeFolder,
    config: MaskConfig,
    cache_dir: str | Path,
    workers: int = 1,
    progress: bool = True,
) -> list[MaskResult]:
    """Proposals for every volume of ``folder``, computed once and cached under ``cache_dir``.

    Each volume's preprocessed image is read from its folder cache entry; proposals already in
    the cache are only checked (a damaged entry is rebuilt with a warning). Writes are atomic,
    so concurrent runs on the same cache never leave a half-written file.

    Args:
        folder: The volumes (``folder.entries``).
        config: Proposal parameters.
        cache_dir: Folder of the mask cache (created if missing).
        workers: Processes working in parallel (``ProcessPoolExecutor`` when > 1; each gets an
            equal share of the CPUs for SimpleITK).
        progress: Show a progress bar.

    Returns:
        One :class:`MaskResult` per entry, in the order of ``folder.entries``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (e.source, e.cache_file, str(mask_cache_path(e, config, cache_dir)), config.to_dict())
        for e in folder.entries
    ]
    bar = tqdm(total=len(jobs), desc="mask proposals", unit="vol", disable=not progress)
    results: list[MaskResult | None] = [None] * len(jobs)
    try:
        if workers == 1:
            for i, job in enumerate(jobs):
                results[i] = _masks_for_volume(*job)
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(threads,)) as ex:
                futures = {ex.submit(_masks_for_volume, *job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        bar.close()
    return [r for r in results if r is not None]


def format_mask_summary(results: Sequence[MaskResult]) -> str:
    """A plain-text table of :func:`compute_folder_masks` results, with totals and means.

    Returns:
        One row per volume (volume, masks, seconds, cached) and a summary line.
    """
    if not results:
        return "no volumes"
    names = [r.source for r in results]
    width = max(len("volume"), *(len(n) for n in names))
    lines = [f"{'volume':<{width}}  {'masks':>5}  {'seconds':>7}  cached"]
    for r in results:
        lines.append(
            f"{r.source:<{width}}  {r.n_masks:>5}  {r.seconds:>7.2f}  {'yes' if r.cached else 'no'}"
        )
    n = len(results)
    total = sum(r.n_masks for r in results)
    computed = [r.seconds for r in results if not r.cached]
    line = f"{n} volumes, {total} masks ({total / n:.1f} per volume)"
    if computed:
        line += (
            f"; computed {len(computed)} in {sum(computed):.1f} s "
            f"({sum(computed) / len(computed):.2f} s per volume)"
        )
    if n - len(computed):
        line += f"; {n - len(computed)} from cache"
    lines.append(line)
    return "\n".join(lines)
