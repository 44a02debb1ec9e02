"""Scans of the few-shot benchmark, read and preprocessed once, and the views methods see.

A :class:`PreparedScan` holds a catalogued scan on its native grid (as
:func:`omnienc.io.read_volume` returns it, with its label map checked to be integer and on the
same grid) and on the encoder's grid (the checkpoint's preprocessing without foreground crop or
fixed size, as :func:`omnienc.pretext.segment.segment_fewshot` uses it). A :class:`View` is a
box of the encoder grid that a method takes as a whole volume: the whole scan, or one half of it
for the intra-scan rows (:func:`halves`), with the native voxels it covers. A :class:`Row` is one
query and every method's scores; a :class:`Target` is what a row is scored against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.benchmarks.fewshot_methods import truth_box
from omnienc.benchmarks.fewshot_pairs import LabelledScan, Structure
from omnienc.data.brats import SEQUENCES, BratsCase
from omnienc.data.folder import check_not_constant
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.errors import DataError
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume


@dataclass
class PreparedScan:
    """A catalogued scan on its native grid and on the encoder's grid.

    Attributes:
        scan: The catalogue entry.
        image: The native volume (RAS+).
        labels: ``(X, Y, Z)`` uint16 label map on ``image``'s grid.
        label_path: The label map's file.
        pre_image: ``(X', Y', Z')`` float32, the encoder's preprocessing (not cropped).
        pre_labels: ``(X', Y', Z')`` uint16 labels on that grid (nearest neighbour).
        pre_affine: ``(4, 4)`` voxel-to-world matrix of the encoder grid.
        spacing: The encoder grid's spacing in mm.
    """

    scan: LabelledScan
    image: Volume
    labels: np.ndarray
    label_path: Path
    pre_image: np.ndarray
    pre_labels: np.ndarray
    pre_affine: np.ndarray
    spacing: tuple[float, float, float] | None

    @cached_property
    def _counts(self) -> np.ndarray:
        return np.bincount(self.labels.ravel())

    def voxels(self, structure: Structure) -> int:
        """Native voxels of a structure."""
        return int(sum(self._counts[i] for i in structure.ids if i < self._counts.size))

    def native_mask(self, structure: Structure) -> np.ndarray:
        """``(X, Y, Z)`` bool on the native grid."""
        return np.isin(self.labels, structure.ids)

    def pre_mask(self, structure: Structure) -> np.ndarray:
        """``(X', Y', Z')`` bool on the encoder grid."""
        return np.isin(self.pre_labels, structure.ids)

    def present(self) -> list[int]:
        """Label values present (0 excluded)."""
        return [int(i) for i in np.flatnonzero(self._counts) if i > 0]


def _labels(array: np.ndarray) -> np.ndarray:
    return array.astype(np.uint16 if array.max() > 255 else np.uint8)


def read_scan(scan: LabelledScan, volumes: Path, preprocessing: Preprocessing) -> PreparedScan:
    """Read one catalogued scan and its label map, check them, preprocess both once.

    Args:
        scan: The catalogue entry.
        volumes: The data root's ``volumes/`` folder.
        preprocessing: The encoder's preprocessing (foreground crop and fixed size are dropped).

    Raises:
        VolumeReadError: A file cannot be read.
        DataError: The label map holds non-integer or negative values (or, for BraTS, values
            outside 0..4), lies on another grid than its image, or the image is constant.
    """
    label_path = volumes / scan.labels
    if scan.brats_case is not None:
        case = BratsCase(scan.brats_case, label_path.parent)
        sequence = next(s for s, f in SEQUENCES.items() if scan.image.endswith(f))
        image = case.read_image(sequence)
        labels = case.read_labels(image)
    else:
        image = read_volume(volumes / scan.image, modality=scan.modality)
        label_volume = read_label_map(label_path)
        check_same_grid(image, label_volume)
        labels = label_volume.array
    check_not_constant(image, "nothing to segment")
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    out = preprocess_volume(image, pre, label=labels)
    return PreparedScan(
        scan=scan,
        image=image,
        labels=_labels(labels),
        label_path=label_path,
        pre_image=out["image"][0],
        pre_labels=_labels(out["label"][0]),
        pre_affine=out["affine"],
        spacing=pre.spacing,
    )


def scan_files(scan: LabelledScan, volumes: Path) -> list[Path]:
    """The files a scan is read from (every file of a DICOM folder), label map last."""
    image = volumes / scan.image
    files = sorted(p for p in image.iterdir() if p.is_file()) if image.is_dir() else [image]
    return [*files, volumes / scan.labels]


@dataclass
class View:
    """A box of a prepared scan's encoder grid that a method sees as a whole volume.

    Attributes:
        scan: The prepared scan.
        box: ``(slice, slice, slice)`` of the encoder grid.
        axis: The axis a half was cut along (``None``: the whole scan).
        upper: Whether the box is the upper half along ``axis``.
    """

    scan: PreparedScan
    box: tuple[slice, slice, slice]
    axis: int | None = None
    upper: bool = False

    @property
    def pre_image(self) -> np.ndarray:
        """``(x, y, z)`` float32, the box of the preprocessed image."""
        return self.scan.pre_image[self.box]

    @property
    def pre_affine(self) -> np.ndarray:
        """The box's ``(4, 4)`` voxel-to-world matrix."""
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in self.box]
        return self.scan.pre_affine @ shift

    def pre_mask(self, structure: Structure) -> np.ndarray:
        """``(x, y, z)`` bool, the structure within the box."""
        return self.scan.pre_mask(structure)[self.box]

    @cached_property
    def native_region(self) -> np.ndarray | None:
        """Native voxels whose nearest encoder-grid voxel lies in the box (``None``: all)."""
        if self.axis is None:
            return None
        a = self.axis
        m = np.linalg.inv(self.scan.pre_affine) @ self.scan.image.affine
        x, y, z = (np.arange(n, dtype=np.float64) for n in self.scan.image.shape)
        coord = m[a, 0] * x[:, None, None] + m[a, 1] * y[None, :, None] + m[a, 2] * z[None, None]
        cut = self.box[a].start if self.upper else self.box[a].stop
        return (coord + m[a, 3] >= cut - 0.5) == self.upper

    def truth(self, structure: Structure) -> np.ndarray:
        """``(X, Y, Z)`` bool on the native grid: the structure within the view."""
        mask = self.scan.native_mask(structure)
        region = self.native_region
        return mask if region is None else mask & region


def whole(scan: PreparedScan) -> View:
    """The whole scan as a view."""
    return View(scan, tuple(slice(0, n) for n in scan.pre_image.shape))  # type: ignore[arg-type]


def halves(scan: PreparedScan, structure: Structure) -> tuple[View, View] | None:
    """The scan cut in two across the structure, for the intra-scan rows.

    The cut is perpendicular to the axis along which the structure extends furthest on the
    encoder grid, through the middle of its bounding box, so that each half holds part of it.

    Returns:
        ``(lower, upper)`` views, or ``None`` when the structure is under 2 voxels long.
    """
    nz = np.nonzero(scan.pre_mask(structure))
    if not nz[0].size:
        return None
    extent = [int(a.max()) - int(a.min()) for a in nz]
    axis = int(np.argmax(extent))
    if extent[axis] < 1:
        return None
    cut = (int(nz[axis].min()) + int(nz[axis].max()) + 1) // 2
    lower = [slice(0, n) for n in scan.pre_image.shape]
    upper = list(lower)
    lower[axis] = slice(0, cut)
    upper[axis] = slice(cut, scan.pre_image.shape[axis])
    return (
        View(scan, tuple(lower), axis, upper=False),  # type: ignore[arg-type]
        View(scan, tuple(upper), axis, upper=True),  # type: ignore[arg-type]
    )


def support_mask(view: View, structure: Structure) -> np.ndarray:
    """The support's mask on the encoder grid, checked.

    Raises:
        DataError: The structure is absent from the support's label map, or vanished when the
            label map was resampled to the encoder spacing; the message names the label file.
    """
    scan = view.scan
    if scan.voxels(structure) == 0:
        present = ", ".join(str(i) for i in scan.present()[:20]) or "none"
        raise DataError(
            scan.label_path,
            f"support mask is empty: no voxel has label {list(structure.ids)} "
            f"({structure.name}); labels present: {present}",
        )
    mask = view.pre_mask(structure)
    if not mask.any():
        raise DataError(
            scan.label_path,
            f"the support mask of {structure.name} ({scan.voxels(structure)} voxels) vanished "
            f"when resampled to the encoder's {scan.spacing} mm spacing; use a coarser "
            "structure or a higher --min-voxels",
        )
    return mask


@dataclass
class Row:
    """One query: a support set, a query (scan or half), a structure, and every method's scores.

    Attributes:
        group: ``CT``, ``BraTS-FLAIR``, ``BraTS-T1c``, ``brain lesion``, ``intra-scan`` or
            ``identity``.
        source: The scans' own group (equal to ``group`` for cross-scan rows).
        structure: The structure.
        supports: Support scan keys (a half is named after its scan).
        query: The query scan key.
        support_voxels: Native voxels of the structure in each support.
        query_voxels: Native voxels of the structure in the query.
        scores: Method -> :func:`~omnienc.benchmarks.fewshot_methods.score`.
    """

    group: str
    source: str
    structure: Structure
    supports: tuple[str, ...]
    query: str
    support_voxels: list[int]
    query_voxels: int
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON row (``dice`` holds each method's Dice for quick reading)."""
        return {
            "group": self.group,
            "source": self.source,
            "structure": self.structure.name,
            "ids": list(self.structure.ids),
            "supports": list(self.supports),
            "query": self.query,
            "shots": len(self.supports),
            "support_voxels": self.support_voxels,
            "query_voxels": self.query_voxels,
            "dice": {m: s["dice"] for m, s in self.scores.items()},
            "scores": self.scores,
        }


@dataclass
class Target:
    """A row's query view, its truth on the native grid and the box outside which is *far*."""

    row: Row
    view: View
    truth: np.ndarray
    box: tuple[slice, ...]

    @classmethod
    def of(cls, row: Row, view: View, st: Structure, window: Sequence[int]) -> Target:
        """The truth of a row on its query view, and the box outside which predictions are far.

        *Far* is more than half a window (``window`` voxels of the encoder grid, in mm) outside
        the truth's box.
        """
        scan = view.scan
        truth = view.truth(st)
        window_mm = np.asarray(window) * np.linalg.norm(scan.pre_affine[:3, :3], axis=0)
        margin = 0.5 * window_mm / np.asarray(scan.image.spacing)
        return cls(row, view, truth, truth_box(truth, margin))


@dataclass
class Cut:
    """A scan cut across a structure: the support half, the query half, the support's mask."""

    lower: View
    upper: View
    mask: np.ndarray
