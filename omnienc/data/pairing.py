"""Pair label maps with the images they label: same folder, same voxel grid.

A label map pairs with every image of a :class:`~omnienc.data.folder.VolumeFolder` manifest that

- lies in the same folder (for a DICOM series, the series folder or the folder holding it: the
  dcmqi layout keeps ``ct-3slice/`` beside its ``liver_seg.nrrd``), and
- has the same native shape and an affine equal within
  :data:`omnienc.data.labeled.GRID_ATOL` (mm and direction cosines).

One label map may pair with several images (a BraTS case's FLAIR and T1c both pair with its
tumour labels and its brain mask) and one image with several label maps (the dcmqi CT with its
liver, spine and heart maps). A grid match cannot prove that two files show the same scan, so
only files in one folder are paired. A label map that matches no image although one in its
folder looks meant for it (same shape, or the same name once tokens such as ``label``/``seg`` and
``image`` are dropped) is reported, naming both files and the difference; other unpaired label
maps (an atlas beside unrelated templates) are simply not paired.

Use the pairs with :class:`~omnienc.data.labeled.LabeledVolumes`:
``LabeledVolumes(pair_label_maps(root))``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnienc.data.folder import ManifestEntry, VolumeFolder
from omnienc.data.labeled import GRID_ATOL
from omnienc.data.labelmaps import LABEL_TOKENS, name_tokens
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

logger = logging.getLogger("omnienc")

# Name tokens dropped before comparing an image's name with a label map's.
_NEUTRAL_TOKENS = frozenset(
    {"image", "img", "volume", "vol", "scan", "nii", "gz", "nrrd", "nhdr", "mha", "mhd"}
    | {"mgz", "mgh", "dcm"}
)


@dataclass(frozen=True)
class LabelPair:
    """An image and a label map on its grid in the same folder.

    Attributes:
        image: The image file, or DICOM series folder.
        label: The label map file.
        series_uid: The image's SeriesInstanceUID when ``image`` is a DICOM folder.
    """

    image: Path
    label: Path
    series_uid: str | None = None

    @property
    def image_id(self) -> str:
        """The image as :class:`~omnienc.data.folder.VolumeFolder` items name it."""
        return str(self.image) + (f"#{self.series_uid}" if self.series_uid else "")

    def __str__(self) -> str:
        return f"{self.image_id} <- {self.label}"


def _folders(entry: ManifestEntry) -> set[Path]:
    """The folders an entry lies in: its parent; a DICOM series also its own folder."""
    path = Path(entry.source)
    return {path.parent, path} if entry.series_uid is not None else {path.parent}


def _stem(entry: ManifestEntry) -> tuple[str, ...]:
    return tuple(sorted(name_tokens(Path(entry.source)) - LABEL_TOKENS - _NEUTRAL_TOKENS))


def _affine(entry: ManifestEntry) -> np.ndarray:
    if entry.affine is None:
        raise DataError(
            entry.source,
            "manifest entry has no affine (written by an older omnienc?): rescan the folder "
            "to pair its label maps",
        )
    return np.asarray(entry.affine, dtype=np.float64)


def grid_difference(image: ManifestEntry, label: ManifestEntry) -> str | None:
    """How two entries' native grids differ, or ``None`` when they are the same grid.

    Returns:
        ``None``, or a phrase such as ``grid (256, 256, 23) differs from (256, 256, 25)`` or
        ``same shape (512, 512, 3) but the affines differ by up to 5 mm``.
    """
    if tuple(image.shape) != tuple(label.shape):
        return f"grid {tuple(label.shape)} differs from {tuple(image.shape)}"
    diff = float(np.abs(_affine(image) - _affine(label)).max())
    if diff > GRID_ATOL:
        return (
            f"same shape {tuple(label.shape)} but the affines differ by up to {diff:.4g} "
            f"(position, orientation or spacing; tolerance {GRID_ATOL:g})"
        )
    return None


def find_pairs(
    entries: Iterable[ManifestEntry],
) -> tuple[list[LabelPair], list[tuple[str, str]]]:
    """Pair the label maps of a manifest with its images, without logging.

    Args:
        entries: Manifest entries (``kind`` ``image`` or ``label``).

    Returns:
        ``(pairs, problems)``: pairs sorted by image then label; ``(label map, problem)`` for
        each label map on another grid than the image it looks meant for.
    """
    entries = list(entries)
    images = [e for e in entries if e.kind == "image"]
    pairs: list[LabelPair] = []
    problems: list[tuple[str, str]] = []
    for label in (e for e in entries if e.kind == "label"):
        label_folders = _folders(label)
        beside = [im for im in images if _folders(im) & label_folders]
        matched = [im for im in beside if grid_difference(im, label) is None]
        pairs += [LabelPair(Path(im.source), Path(label.source), im.series_uid) for im in matched]
        if matched:
            continue
        stem = _stem(label)
        meant = [
            im
            for im in beside
            if tuple(im.shape) == tuple(label.shape) or (stem and _stem(im) == stem)
        ]
        for im in meant[:1]:
            problems.append(
                (
                    label.source,
                    f"label map not paired with the image beside it {im.source}: its "
                    f"{grid_difference(im, label)}; resample the label map onto the image grid "
                    "(nearest neighbour) or fix its header",
                )
            )
    pairs.sort(key=lambda p: (p.image_id, str(p.label)))
    return pairs, problems


def pair_label_maps(
    source: VolumeFolder | Sequence[ManifestEntry] | str | Path,
    *,
    strict: bool = False,
    preprocessing: Preprocessing | None = None,
    cache_dir: str | Path | None = None,
) -> list[LabelPair]:
    """Image/label-map pairs of a folder: same folder, same grid (see the module docstring).

    Args:
        source: A scanned :class:`~omnienc.data.folder.VolumeFolder`, its manifest, or a root
            folder to scan (label maps included; ``preprocessing`` and ``cache_dir`` go to the
            scan).
        strict: Raise instead of warning about a label map on another grid than its image.
        preprocessing: Preprocessing of the scan when ``source`` is a folder path.
        cache_dir: Cache of the scan when ``source`` is a folder path.

    Returns:
        The pairs, sorted by image then label map.

    Raises:
        DataError: With ``strict``, a label map whose grid differs from the image beside it that
            looks meant for it (same shape, or the same name without ``label``/``image``
            tokens); the message names both files and the difference. Without ``strict`` that
            is one warning per label map.
    """
    if isinstance(source, str | Path):
        source = VolumeFolder(
            source, preprocessing, cache_dir=cache_dir, include_labels=True, progress=False
        )
    entries = source.manifest if isinstance(source, VolumeFolder) else list(source)
    pairs, problems = find_pairs(entries)
    for label, problem in problems:
        if strict:
            raise DataError(label, problem)
        logger.warning("%s: %s", label, problem)
    return pairs
