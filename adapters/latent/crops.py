"""Labelled structure crops: a fixed-size box around each structure of a label map.

For an image and its label map on the same grid (e.g. a TotalSegmentator segmentation), both are
preprocessed together the way the encoder expects, and one crop is cut around the centroid of
every structure with enough voxels. The crop's label is the structure name
(:mod:`omnienc.data.labelnames`); :func:`structure_group` gives a coarse organ group. The latent
map (:mod:`omnienc.adapters.latent`) embeds these crops beside whole volumes and MedMNIST items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnienc.config import positive_int_triple
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.data.labelnames import structure_names
from omnienc.errors import DataError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

DEFAULT_CROP = (32, 32, 32)

# The image/label-map pairs under <data root>/volumes that structure crops come from.
SHARED_STRUCTURE_PAIRS: tuple[tuple[str, str, str | None], ...] = (
    ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", None),
    ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz", None),
    ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz", None),
    (
        "totalsegmentator/pulmonary_ct_cropped.nii.gz",
        "totalsegmentator/pulmonary_artery_seg.nii.gz",
        "pulmonary_artery",
    ),
)

# Coarse organ groups of TotalSegmentator structures: (group, name prefixes or exact names).
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("spine", ("vertebrae", "intervertebral_discs", "sacrum", "spinal_cord")),
    ("rib cage", ("rib_", "sternum", "costal_cartilages")),
    ("lung / airway", ("lung", "trachea")),
    ("heart", ("heart", "atrial_appendage")),
    (
        "vessel",
        (
            "aorta",
            "pulmonary",
            "brachiocephalic",
            "subclavian",
            "common_carotid",
            "superior_vena_cava",
            "inferior_vena_cava",
            "portal_vein",
            "iliac_",
        ),
    ),
    ("muscle", ("gluteus", "autochthon", "iliopsoas")),
    ("bone", ("humerus", "scapula", "clavicula", "femur", "hip", "skull")),
    (
        "abdominal organ",
        (
            "spleen",
            "kidney",
            "gallbladder",
            "liver",
            "stomach",
            "pancreas",
            "adrenal_gland",
        ),
    ),
    ("gut", ("esophagus", "small_bowel", "duodenum", "colon")),
    ("pelvic organ", ("urinary_bladder", "prostate")),
    ("brain", ("brain",)),
    ("thyroid", ("thyroid_gland",)),
)


def structure_group(name: str) -> str:
    """The coarse organ group of a TotalSegmentator structure name (``"other"`` if none).

    >>> structure_group("vertebrae_L3"), structure_group("kidney_left")
    ('spine', 'abdominal organ')
    """
    for group, prefixes in _GROUPS:
        if name.startswith(prefixes):
            return group
    return "other"


@dataclass(frozen=True)
class StructureCrop:
    """A fixed-size crop of a preprocessed image centred on one labelled structure.

    Attributes:
        image: ``(1, S0, S1, S2)`` float32, padded with the image minimum beyond its border.
        structure_id: The label value in the label map.
        name: Structure name.
        voxels: Voxels of the structure on the preprocessed grid.
        centre: Centre voxel of the crop on the preprocessed grid (the structure's centroid).
    """

    image: np.ndarray
    structure_id: int
    name: str
    voxels: int
    centre: tuple[int, int, int]


def structure_crops(
    image_path: str | Path,
    label_path: str | Path,
    preprocessing: Preprocessing,
    crop_size: Sequence[int] = DEFAULT_CROP,
    min_voxels: int = 100,
    names: str | Mapping[int, str] | None = None,
) -> tuple[list[StructureCrop], str]:
    """One crop around each structure of a label map with at least ``min_voxels`` voxels.

    The image and its label map (same grid, checked) get the encoder's ``preprocessing``
    (resampled together, the labels by nearest neighbour) without its final pad/crop to a fixed
    size and without the foreground crop, so every structure stays on the grid. Each crop is
    ``crop_size`` voxels centred on the structure's centroid; it shows the structure in its
    surroundings (neighbouring structures' crops overlap, e.g. adjacent vertebrae).

    Args:
        image_path: Volume file or DICOM folder.
        label_path: Integer label map on the image's grid.
        preprocessing: The encoder's preprocessing.
        crop_size: ``(S0, S1, S2)`` voxels of the preprocessed grid.
        min_voxels: Smallest structure kept, in preprocessed voxels.
        names: A string names every structure (for a binary mask); a mapping names them by id
            (``label K`` for ids it lacks; ``{}`` names all by id); ``None`` reads the ids as
            TotalSegmentator classes (:func:`omnienc.data.labelnames.structure_names`).

    Returns:
        ``(crops, modality)``: crops in label order, and the image's modality.

    Raises:
        VolumeReadError: A file cannot be read.
        DataError: The grids differ, the label map is not integer, or no structure is large
            enough.
    """
    size = positive_int_triple("crop_size", crop_size)
    image = read_volume(image_path)
    labels = read_label_map(label_path)
    check_same_grid(image, labels)
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    out = preprocess_volume(image, pre, label=labels.array)
    img, lab = out["image"][0], out["label"][0]  # (X, Y, Z) each
    table = structure_names(label_path) if names is None or isinstance(names, str) else names
    ids, counts = np.unique(lab, return_counts=True)
    half = [s // 2 for s in size]
    padded = np.pad(
        img,
        [(h, s - h) for h, s in zip(half, size, strict=True)],
        "constant",
        constant_values=float(img.min()),
    )
    crops: list[StructureCrop] = []
    for k, n in zip(ids.tolist(), counts.tolist(), strict=True):
        if k == 0 or n < min_voxels:
            continue
        centre = tuple(round(float(c)) for c in np.argwhere(lab == k).mean(axis=0))
        # A crop [c - h, c - h + s) on the image is [c, c + s) on the padded array.
        box = tuple(slice(c, c + s) for c, s in zip(centre, size, strict=True))
        crops.append(
            StructureCrop(
                image=np.ascontiguousarray(padded[box][None], dtype=np.float32),
                structure_id=int(k),
                name=names if isinstance(names, str) else table.get(int(k), f"label {k}"),
                voxels=int(n),
                centre=centre,  # type: ignore[arg-type]
            )
        )
    if not crops:
        raise DataError(
            label_path,
            f"no structure has {min_voxels} or more voxels after preprocessing to "
            f"{pre.spacing} mm (largest: {int(counts[ids > 0].max()) if (ids > 0).any() else 0})",
        )
    return crops, image.modality


class CropDataset(Dataset[dict[str, Any]]):
    """Crops as ``{"image": (1, S0, S1, S2) tensor, "id": str}`` items for feature extraction."""

    def __init__(self, crops: Sequence[StructureCrop], ids: Sequence[str]) -> None:
        self.crops, self.ids = list(crops), list(ids)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.crops[i].image), "id": self.ids[i]}
