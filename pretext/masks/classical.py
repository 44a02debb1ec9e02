"""The classical mask providers: SimpleITK, NumPy and SciPy, no model weights, no GPU.

``merge``
    Region merging (:func:`merge_masks`): a fine watershed of the gradient magnitude (computed at
    half resolution for speed) is merged greedily by a size-weighted dissimilarity of adjacent
    regions (boundary gradient and difference of mean intensity, weighted by
    ``(n_a n_b / (n_a + n_b)) ** p`` as in Ward's linkage), and the partitions with
    ``merge_regions`` regions are the proposals.
``otsu``
    Multi-level Otsu thresholds of the smoothed intensities inside the body, each class opened
    (to cut thin bridges) and split into connected components (:func:`otsu_masks`).
``watershed``
    ``sitk.MorphologicalWatershed`` of the gradient magnitude at a few flooding levels
    (:func:`watershed_masks`).
``slic``
    3D SLIC supervoxels (``sitk.SLICImageFilter``) at a few grid sizes (:func:`slic_masks`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from omnienc.pretext.masks.config import MaskConfig
from omnienc.pretext.masks.image import _from_sitk, _interleave, _to_sitk, equalize


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
