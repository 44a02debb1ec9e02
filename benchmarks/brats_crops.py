"""Tumour and tumour-free crops of BraTS cases, on the encoder's preprocessed grid.

A case (:class:`omnienc.data.brats.BratsCase`) is read once and preprocessed the way the encoder
expects, without the foreground crop and the final pad/crop (as :mod:`omnienc.pretext.segment`
does), so the crops are cut on the encoder's own grid (2 mm for the shipped checkpoint):
:func:`prepare_case`. The labels and the brain mask follow the image through the resampling
(nearest neighbour, as one label map: ``labels + 5 * brain``).

:func:`sample_case_crops` draws crop centres of two classes, ``per_class`` of each:

* **tumour**: the centre voxel is in the whole tumour (BraTS labels 1-4);
* **tumour-free**: the centre voxel is in the brain mask and no voxel of the crop is tumour;

both with at least ``min_brain_fraction`` of the crop's voxels in the brain mask (voxels beyond
the grid count as outside), and at least ``min_distance`` voxels between the centres of one class
(a greedy Poisson-disk draw in a seeded random order). Tumour-free crops must keep clear of the
tumour, so they lie at the edge of the brain and hold less brain than tumour crops; a classifier
could then tell the classes by how much background a crop shows. With
``match_brain_fraction`` the tumour centres are drawn with weights that give their brain
fractions the distribution of the tumour-free candidates' (binned in steps of 0.05), which
removes most of that shortcut; the benchmark reports how much is left (a probe on the brain
fraction alone).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.config import positive_int_triple
from omnienc.data.brats import SEQUENCES, BratsCase, tumour_region
from omnienc.data.labeled import GRID_ATOL, check_same_grid, read_label_map
from omnienc.errors import DataError
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

DEFAULT_CROP = (32, 32, 32)
CLASSES = ("tumour-free", "tumour")  # label 0, label 1
_BRAIN_CODE = 5  # labels + 5 * brain: one nearest-neighbour label map carries both
_FRACTION_BIN = 0.05


@dataclass(frozen=True)
class CropSampling:
    """How crops are drawn from each case.

    Attributes:
        crop_size: ``(S0, S1, S2)`` voxels of the preprocessed grid (the encoder's crop size).
        per_class: Crops of each class per case.
        min_distance: Smallest Euclidean distance between two centres of one class, in voxels.
        min_brain_fraction: Smallest share of a crop's voxels inside the brain mask.
        match_brain_fraction: Weight the tumour centres so that their brain fractions follow
            the tumour-free candidates' distribution.
        seed: Seeds the draw (with the case name and the class).
    """

    crop_size: tuple[int, int, int] = DEFAULT_CROP
    per_class: int = 24
    min_distance: float = 8.0
    min_brain_fraction: float = 0.5
    match_brain_fraction: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", positive_int_triple("crop_size", self.crop_size))
        if self.per_class < 1 or self.min_distance < 0:
            raise ValueError(
                f"need per_class >= 1 and min_distance >= 0, got {self.per_class}, "
                f"{self.min_distance}"
            )
        if not 0.0 <= self.min_brain_fraction <= 1.0:
            raise ValueError(f"min_brain_fraction must be in [0, 1], got {self.min_brain_fraction}")


@dataclass
class PreparedCase:
    """One case on the encoder's preprocessed grid.

    Attributes:
        case: The case folder.
        images: Sequence name -> ``(X, Y, Z)`` float32 preprocessed image.
        tumour: ``(X, Y, Z)`` bool whole tumour (labels 1-4).
        brain: ``(X, Y, Z)`` bool brain mask.
    """

    case: BratsCase
    images: dict[str, np.ndarray]
    tumour: np.ndarray
    brain: np.ndarray


@dataclass
class CaseCrops:
    """The crops drawn from one case (centres only; :func:`cut_crops` cuts the images).

    Attributes:
        case: The case name.
        centres: ``(N, 3)`` int centre voxels on the preprocessed grid, tumour-free ones first.
        labels: ``(N,)`` int64, 1 tumour, 0 tumour-free.
        brain_fraction: ``(N,)`` share of each crop's voxels in the brain mask.
        tumour_fraction: ``(N,)`` share of each crop's voxels in the tumour.
    """

    case: str
    centres: np.ndarray
    labels: np.ndarray
    brain_fraction: np.ndarray
    tumour_fraction: np.ndarray


def _check_sequence_grid(reference: Volume, other: Volume) -> None:
    """Refuse a second sequence whose voxel grid differs from the first's."""
    same = reference.shape == other.shape and np.allclose(
        reference.affine, other.affine, atol=GRID_ATOL
    )
    if not same:
        raise DataError(
            other.source,
            f"its grid {other.shape} (affine {np.round(other.affine, 3).tolist()}) differs from "
            f"{reference.source} {reference.shape} (affine "
            f"{np.round(reference.affine, 3).tolist()}); BraTS sequences must be co-registered",
        )


def prepare_case(
    case: BratsCase, preprocessing: Preprocessing, sequences: Sequence[str] = tuple(SEQUENCES)
) -> PreparedCase:
    """Read a case and put its sequences, tumour and brain mask on the encoder's grid.

    Args:
        case: The case folder.
        preprocessing: The encoder's preprocessing; its foreground crop and final pad/crop are
            dropped so that the whole head stays on the grid.
        sequences: Which sequences to read (keys of :data:`omnienc.data.brats.SEQUENCES`).

    Returns:
        The :class:`PreparedCase`.

    Raises:
        VolumeReadError: A file cannot be read.
        DataError: The labels or the brain mask do not share the first sequence's grid, the
            sequences' grids differ, the labels are not 0..4, or no tumour voxel is left after
            resampling.
    """
    if not sequences:
        raise ValueError("need at least one sequence")
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    first = case.read_image(sequences[0])
    labels = case.read_labels(first)
    brain = case.read_brain_mask(first)
    if not (labels > 0).any():
        raise DataError(case.label_path, "has no tumour voxel (labels 1-4); nothing to crop")
    code = labels + _BRAIN_CODE * brain.astype(np.int64)
    out = preprocess_volume(first, pre, label=code)
    images = {sequences[0]: out["image"][0]}
    for seq in sequences[1:]:
        volume = case.read_image(seq)
        _check_sequence_grid(first, volume)
        images[seq] = preprocess_volume(volume, pre)["image"][0]
    grid = out["label"][0]
    tumour = tumour_region(grid % _BRAIN_CODE, "whole_tumour")
    if not tumour.any():
        raise DataError(
            case.label_path,
            f"its {int((labels > 0).sum())} tumour voxels vanish when resampled to "
            f"{pre.spacing} mm; nothing to crop",
        )
    return PreparedCase(case, images, tumour, grid >= _BRAIN_CODE)


def box_counts(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Voxels of ``mask`` inside the crop centred on every voxel (summed-area table).

    The crop centred on voxel ``c`` spans ``[c - s // 2, c - s // 2 + s)`` along each axis, as
    :func:`cut_crops` cuts it; voxels beyond the grid count as outside the mask.

    Args:
        mask: ``(X, Y, Z)`` bool.
        size: ``(S0, S1, S2)``.

    Returns:
        ``(X, Y, Z)`` int64 counts.
    """
    pads = [(s // 2, s - s // 2) for s in size]
    table = np.pad(np.pad(mask.astype(np.int64), pads), [(1, 0)] * 3)
    for axis in range(3):
        table = table.cumsum(axis)
    # A crop [c - h, c - h + s) on the grid is [c, c + s) on the padded grid:
    # table[c + s] - table[c] along each axis in turn.
    for axis, (s, n) in enumerate(zip(size, mask.shape, strict=True)):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis], lo[axis] = slice(s, s + n), slice(0, n)
        table = table[tuple(hi)] - table[tuple(lo)]
    return table


def sample_centres(
    candidates: np.ndarray,
    n: int,
    min_distance: float,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Up to ``n`` candidates, pairwise at least ``min_distance`` apart (greedy, random order).

    The order is a uniform shuffle, or with ``weights`` a weighted draw without replacement
    (Efraimidis and Spirakis, https://doi.org/10.1016/j.ipl.2005.11.003; zero weights last).
    Each accepted centre removes the candidates closer than ``min_distance`` to it.

    Args:
        candidates: ``(M, 3)`` int voxel indices.
        n: How many to take.
        min_distance: In voxels.
        rng: The random generator.
        weights: ``(M,)`` non-negative sampling weights, or ``None``.

    Returns:
        ``(K, 3)`` int64 with ``K <= n`` (fewer when the candidates run out).
    """
    m = len(candidates)
    if weights is None:
        order = rng.permutation(m)
    else:
        u = rng.random(m)
        positive = weights > 0
        keys = np.where(positive, np.log(u) / np.where(positive, weights, 1.0), -np.inf)
        order = np.lexsort((u, keys))[::-1]  # by key, descending; zero weights in random order
    remaining = np.asarray(candidates, dtype=np.int64)[order]
    chosen: list[np.ndarray] = []
    while len(chosen) < n and len(remaining):
        centre = remaining[0]
        chosen.append(centre)
        far = ((remaining - centre) ** 2).sum(axis=1) >= min_distance**2
        remaining = remaining[far]
    return np.asarray(chosen, dtype=np.int64).reshape(-1, 3)


def _matching_weights(values: np.ndarray, target: np.ndarray, lowest: float) -> np.ndarray:
    """Weights that give ``values`` the binned distribution of ``target`` (both in [lowest, 1])."""
    n_bins = max(1, int(np.ceil((1.0 - lowest) / _FRACTION_BIN - 1e-9)))
    edges = np.linspace(lowest, 1.0 + 1e-9, n_bins + 1)
    have = np.histogram(values, edges)[0] / max(len(values), 1)
    want = np.histogram(target, edges)[0] / max(len(target), 1)
    ratio = np.divide(want, have, out=np.zeros_like(want), where=have > 0)
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(ratio) - 1)
    return ratio[bins]


def sample_case_crops(prepared: PreparedCase, sampling: CropSampling) -> CaseCrops:
    """Draw ``per_class`` tumour and tumour-free crop centres from one case.

    Args:
        prepared: The case on the preprocessed grid.
        sampling: The rules.

    Returns:
        The :class:`CaseCrops`, tumour-free first, each class in draw order.

    Raises:
        DataError: Too few crops of a class meet the rules: naming the label file (tumour) or
            the brain mask (tumour-free), with the counts.
    """
    size, f = sampling.crop_size, sampling.min_brain_fraction
    voxels = float(np.prod(size))
    brain_frac = box_counts(prepared.brain, size) / voxels
    tumour_frac = box_counts(prepared.tumour, size) / voxels
    enough_brain = brain_frac >= f
    healthy_cand = np.argwhere(prepared.brain & (tumour_frac == 0) & enough_brain)
    tumour_cand = np.argwhere(prepared.tumour & enough_brain)
    weights = None
    if sampling.match_brain_fraction and len(healthy_cand):
        weights = _matching_weights(
            brain_frac[tuple(tumour_cand.T)], brain_frac[tuple(healthy_cand.T)], f
        )
    case = prepared.case
    rules = (
        f"{sampling.per_class} crops of {'x'.join(map(str, size))} voxels at least "
        f"{sampling.min_distance:g} voxels apart with at least {f:.0%} brain"
    )
    picked = []
    for label, (cand, w, file, where) in enumerate(
        (
            (healthy_cand, None, case.brain_mask_path, "centred in the brain with no tumour voxel"),
            (tumour_cand, weights, case.label_path, "centred in the whole tumour"),
        )
    ):
        rng = np.random.default_rng([sampling.seed, zlib.crc32(case.name.encode()), label])
        centres = sample_centres(cand, sampling.per_class, sampling.min_distance, rng, w)
        if len(centres) < sampling.per_class:
            raise DataError(
                file,
                f"case {case.name}: only {len(centres)} {CLASSES[label]} crops {where} "
                f"({len(cand)} candidate centres; brain {int(prepared.brain.sum())} voxels, "
                f"tumour {int(prepared.tumour.sum())} voxels on the preprocessed grid), but "
                f"the benchmark asks for {rules}; lower the crops per class or the distance",
            )
        picked.append(centres)
    centres = np.concatenate(picked)
    index = tuple(centres.T)
    return CaseCrops(
        case=case.name,
        centres=centres,
        labels=np.repeat(np.arange(2, dtype=np.int64), [len(p) for p in picked]),
        brain_fraction=brain_frac[index],
        tumour_fraction=tumour_frac[index],
    )


def cut_crops(image: np.ndarray, centres: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Crops of ``size`` centred on ``centres``, padded with the image minimum beyond the grid.

    Args:
        image: ``(X, Y, Z)`` preprocessed image.
        centres: ``(N, 3)`` int voxel indices.
        size: ``(S0, S1, S2)``.

    Returns:
        ``(N, 1, S0, S1, S2)`` float32.
    """
    half = [s // 2 for s in size]
    padded = np.pad(
        image,
        [(h, s - h) for h, s in zip(half, size, strict=True)],
        constant_values=float(image.min()),
    )
    out = np.empty((len(centres), 1, *size), dtype=np.float32)
    for i, c in enumerate(np.asarray(centres, dtype=np.int64)):
        # [c - h, c - h + s) on the image is [c, c + s) on the padded array.
        out[i, 0] = padded[tuple(slice(int(v), int(v) + s) for v, s in zip(c, size, strict=True))]
    return out


def lesion_crop_count(
    image_path: Path, label_path: Path, preprocessing: Preprocessing, sampling: CropSampling
) -> dict[str, Any]:
    """How many lesion-centred crops an image/label pair without a brain mask can give.

    The pair is preprocessed like a BraTS case and lesion centres are drawn by the same distance
    rule (no brain-fraction rule: there is no brain mask), as many as the greedy draw finds.

    Returns:
        ``{"shape", "spacing", "lesion_voxels" (native), "lesion_voxels_preprocessed",
        "lesion_crops"}``.

    Raises:
        VolumeReadError: A file cannot be read.
        DataError: The grids differ or the label map is not integer.
    """
    image = read_volume(image_path, modality="MR")
    labels = read_label_map(label_path)
    check_same_grid(image, labels)
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    lesion = preprocess_volume(image, pre, label=(labels.array > 0).astype(np.int64))["label"][0]
    rng = np.random.default_rng([sampling.seed, zlib.crc32(Path(image_path).name.encode()), 1])
    centres = sample_centres(np.argwhere(lesion > 0), 10_000, sampling.min_distance, rng)
    return {
        "shape": list(image.shape),
        "spacing": [round(float(s), 3) for s in image.spacing],
        "lesion_voxels": int((labels.array > 0).sum()),
        "lesion_voxels_preprocessed": int((lesion > 0).sum()),
        "lesion_crops": len(centres),
    }


def lesion_counts(
    folder: Path, names: Sequence[str], pre: Preprocessing, sampling: CropSampling
) -> dict[str, Any]:
    """:func:`lesion_crop_count` of ``folder/NAME_image.nrrd`` + ``NAME_label.nrrd`` pairs.

    Returns:
        ``{"cases": {name: counts}, "evaluated": False, "reason": why not}``: volumes without a
        brain mask have no tumour-free crops by the BraTS rules, so they are only counted.
    """
    counts = {
        name: lesion_crop_count(
            folder / f"{name}_image.nrrd", folder / f"{name}_label.nrrd", pre, sampling
        )
        for name in names
        if (folder / f"{name}_image.nrrd").is_file() and (folder / f"{name}_label.nrrd").is_file()
    }
    found = "; ".join(f"{k}: {c['lesion_crops']} lesion crops" for k, c in counts.items())
    reason = (
        f"needs {sampling.per_class} lesion-centred crops per case at least "
        f"{sampling.min_distance:g} voxels apart ({found}), and a brain mask for the "
        "tumour-free crops, which these volumes lack (they are not skull-stripped)"
        if counts
        else "the files are absent"
    )
    return {"cases": counts, "evaluated": False, "reason": reason}
