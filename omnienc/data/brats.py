"""BraTS cases on disk: FLAIR and T1c images, tumour labels, brain mask, tumour regions.

The layout is DeepMedic's copy of BraTS 2013/2015 (``../shared/data/volumes/brats/``): one folder
per case holding ``Flair_subtrMeanDivStd.nii.gz``, ``T1c_subtrMeanDivStd.nii.gz`` (already
z-scored inside the brain, skull-stripped, co-registered, 1 mm), ``OTMultiClass.nii.gz`` (labels
0-4 stored as float32: 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing) and
``brainmask.nii.gz`` (0/1, stored as scaled int32). The evaluation regions are the BraTS ones
(Menze et al., IEEE TMI 2015, https://doi.org/10.1109/TMI.2014.2377694): whole tumour
{1, 2, 3, 4}, tumour core {1, 3, 4}, enhancing tumour {4}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.errors import DataError
from omnienc.io import Volume, read_volume

# File name of each MR sequence in a case folder.
SEQUENCES = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
LABEL_FILE = "OTMultiClass.nii.gz"
BRAIN_MASK_FILE = "brainmask.nii.gz"
# BraTS evaluation regions: name -> label values that make it up.
TUMOUR_REGIONS: dict[str, tuple[int, ...]] = {
    "whole_tumour": (1, 2, 3, 4),
    "tumour_core": (1, 3, 4),
    "enhancing_tumour": (4,),
}


@dataclass(frozen=True)
class BratsCase:
    """One BraTS case folder.

    Attributes:
        name: The folder name, e.g. ``brats_2013_pat0003_1``.
        folder: The folder.
    """

    name: str
    folder: Path

    def image_path(self, sequence: str) -> Path:
        """Path of one sequence's image (``flair`` or ``t1c``)."""
        if sequence not in SEQUENCES:
            raise ValueError(
                f"unknown BraTS sequence {sequence!r}; expected one of {list(SEQUENCES)}"
            )
        return self.folder / SEQUENCES[sequence]

    @property
    def label_path(self) -> Path:
        return self.folder / LABEL_FILE

    @property
    def brain_mask_path(self) -> Path:
        return self.folder / BRAIN_MASK_FILE

    def read_image(self, sequence: str) -> Volume:
        """The sequence's image as MR, RAS+ (``(240, 240, 155)`` float32 for BraTS)."""
        return read_volume(self.image_path(sequence), modality="MR")

    def read_labels(self, reference: Volume | None = None) -> np.ndarray:
        """The tumour labels, ``(X, Y, Z)`` int64 in 0..4, checked against ``reference``'s grid.

        Raises:
            DataError: The labels are not integers in 0..4, or their grid differs from the image.
        """
        labels = read_label_map(self.label_path)
        if reference is not None:
            check_same_grid(reference, labels)
        arr = labels.array.astype(np.int64)
        bad = np.setdiff1d(np.unique(arr), np.arange(5))
        if bad.size:
            raise DataError(
                self.label_path, f"BraTS labels must be 0..4, found {bad[:10].tolist()}"
            )
        return arr

    def read_brain_mask(self, reference: Volume | None = None) -> np.ndarray:
        """The brain mask, ``(X, Y, Z)`` bool, checked against ``reference``'s grid."""
        mask = read_label_map(self.brain_mask_path)
        if reference is not None:
            check_same_grid(reference, mask)
        return mask.array > 0


def tumour_region(labels: np.ndarray, region: str) -> np.ndarray:
    """One BraTS evaluation region of a label array.

    Args:
        labels: ``(X, Y, Z)`` integer labels 0..4.
        region: A key of :data:`TUMOUR_REGIONS`.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    if region not in TUMOUR_REGIONS:
        raise ValueError(
            f"unknown tumour region {region!r}; expected one of {list(TUMOUR_REGIONS)}"
        )
    return np.isin(labels, TUMOUR_REGIONS[region])


def find_brats_cases(root: str | Path) -> list[BratsCase]:
    """BraTS case folders below ``root`` (the data root, its ``volumes/`` or ``volumes/brats``).

    A folder is a case when it holds the label file and both sequences. Sorted by name.

    Raises:
        DataError: No case folder was found.
    """
    root = Path(root)
    candidates = [root / "volumes" / "brats", root / "brats", root]
    base = next((c for c in candidates if c.is_dir()), root)
    cases = (
        sorted(
            (
                BratsCase(p.name, p)
                for p in base.iterdir()
                if p.is_dir()
                and (p / LABEL_FILE).is_file()
                and all((p / f).is_file() for f in SEQUENCES.values())
            ),
            key=lambda c: c.name,
        )
        if base.is_dir()
        else []
    )
    if not cases:
        raise DataError(
            base,
            f"no BraTS case folder (one holding {LABEL_FILE} and "
            f"{' and '.join(SEQUENCES.values())}) found",
        )
    return cases
