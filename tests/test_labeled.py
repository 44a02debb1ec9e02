"""LabeledVolumes on the real TotalSegmentator pair, and every pair it must refuse."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from omnienc.data.labeled import LabeledVolumes, read_label_map
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

MR_IMAGE = "totalsegmentator/example_mr_sm.nii.gz"  # (117, 91, 20) at 3 mm
MR_LABEL = "totalsegmentator/example_seg_mr.nii.gz"  # same grid
CT_LONG = "totalsegmentator/example_ct.nii.gz"  # (122, 101, 112): not the grid of example_seg
CT_LABEL = "totalsegmentator/example_seg.nii.gz"  # (122, 101, 30)
PRE = Preprocessing(spacing=(4.0, 4.0, 4.0))


def _write_like(src: Path, dest: Path, data: np.ndarray | None = None, shift=(0.0, 0.0, 0.0)):
    """Write ``src``'s voxels (or ``data``) with its affine, translated by ``shift`` mm."""
    img = nib.load(src)
    affine = img.affine.copy()
    affine[:3, 3] += shift
    array = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(array, affine), dest)
    return dest


def test_real_pair_items_share_shape_and_keep_labels(volumes: Path):
    ds = LabeledVolumes([(volumes / MR_IMAGE, volumes / MR_LABEL)], preprocessing=PRE)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert item["image"].shape == item["label"].shape
    assert item["image"].ndim == 4 and item["image"].shape[0] == 1
    original = set(np.unique(np.asarray(nib.load(volumes / MR_LABEL).dataobj)).tolist())
    values = set(torch.unique(item["label"]).tolist())
    assert values <= original and len(values) > 5
    assert item["id"] == str(volumes / MR_IMAGE)
    assert item["modality"] == "MR"
    assert ds[0] is item  # preprocessed once


def test_mismatched_grid_names_both_files(volumes: Path):
    image, label = volumes / CT_LONG, volumes / CT_LABEL
    with pytest.raises(DataError, match="grid") as info:
        LabeledVolumes([(image, label)], preprocessing=PRE)
    assert str(image) in str(info.value) and str(label) in str(info.value)


def test_shifted_affine_is_refused_naming_both_files(volumes: Path, tmp_path: Path):
    image = volumes / MR_IMAGE
    shifted = _write_like(volumes / MR_LABEL, tmp_path / "shifted_seg.nii.gz", shift=(5, 0, 0))
    with pytest.raises(DataError, match="affine") as info:
        LabeledVolumes([(image, shifted)], preprocessing=PRE)
    assert str(image) in str(info.value) and str(shifted) in str(info.value)


def test_non_integer_label_map_is_refused(volumes: Path, tmp_path: Path):
    labels = np.asarray(nib.load(volumes / MR_LABEL).dataobj).astype(np.float32)
    labels[0, 0, 0] = 0.5
    bad = _write_like(volumes / MR_LABEL, tmp_path / "float_seg.nii.gz", data=labels)
    with pytest.raises(DataError, match="non-integer") as info:
        LabeledVolumes([(volumes / MR_IMAGE, bad)], preprocessing=PRE)
    assert str(bad) in str(info.value)


def test_negative_labels_are_refused(volumes: Path, tmp_path: Path):
    labels = np.asarray(nib.load(volumes / MR_LABEL).dataobj).astype(np.int16)
    labels[0, 0, 0] = -1
    bad = _write_like(volumes / MR_LABEL, tmp_path / "negative_seg.nii.gz", data=labels)
    with pytest.raises(DataError, match="negative") as info:
        read_label_map(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="negative"):
        LabeledVolumes([(volumes / MR_IMAGE, bad)], preprocessing=PRE)


def test_empty_pairs_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        LabeledVolumes([])


def test_brats_float32_labels_pair_with_their_image(volumes: Path, tmp_path: Path):
    """A crop of a BraTS case: FLAIR with its float32 tumour labels, read as int64 0..4."""
    case = volumes / "brats/brats_2013_pat0005_1"
    box = np.s_[50:190, 24:192, 60:100]
    paths = []
    for name in ("Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz"):
        src = nib.load(case / name)
        dest = tmp_path / name
        crop = np.asarray(src.dataobj[box], dtype=np.float32)
        # The crop starts at voxel (50, 24, 60): shift the affine so the grid stays the same.
        affine = src.affine.copy()
        affine[:3, 3] = src.affine[:3, :3] @ np.array([50, 24, 60]) + src.affine[:3, 3]
        nib.save(nib.Nifti1Image(crop, affine), dest)
        paths.append(dest)
    labels = read_label_map(paths[1])
    assert set(np.unique(labels.array).tolist()) <= {0, 1, 2, 3, 4}
    ds = LabeledVolumes([(paths[0], paths[1])], preprocessing=PRE)
    item = ds[0]
    assert item["label"].dtype == torch.int64 and item["image"].shape == item["label"].shape
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2, 3, 4}
    assert int(item["label"].max()) >= 2  # the tumour is in the crop
    assert item["modality"] == "MR"
