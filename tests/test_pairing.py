"""Label maps paired with their images by folder and grid, on the real data sets that ship pairs."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from omnienc.data.folder import VolumeFolder
from omnienc.data.labeled import LabeledVolumes, read_label_map
from omnienc.data.pairing import LabelPair, find_pairs, pair_label_maps
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

BRATS_CASE = "brats/brats_2013_pat0005_1"
# Coarse and uncropped: pairing reads native grids; preprocessing only has to run.
PRE = Preprocessing(spacing=(6.0, 6.0, 6.0), crop_foreground=False)


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        dest.mkdir()
        for f in sorted(src.iterdir()):
            os.symlink(f, dest / f.name)
    else:
        os.symlink(src, dest)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, volumes: Path) -> VolumeFolder:
    """One folder per real set that ships image/label pairs (symbolic links to the files)."""
    root = tmp_path_factory.mktemp("pairs")
    for rel in sorted(os.listdir(volumes / BRATS_CASE)):
        if rel.endswith(".nii.gz"):
            _link(volumes / BRATS_CASE / rel, root / "brats" / rel)
    for name in sorted(os.listdir(volumes / "pyradiomics")):
        _link(volumes / "pyradiomics" / name, root / "pyradiomics" / name)
    for name in sorted(os.listdir(volumes / "dcmqi")):
        _link(volumes / "dcmqi" / name, root / "dcmqi" / name)
    for name in sorted(os.listdir(volumes / "monai")):
        _link(volumes / "monai" / name, root / "monai" / name)
    for name in (
        "example_ct_sm.nii.gz",
        "example_seg.nii.gz",
        "example_seg_fast.nii.gz",
        "example_mr_sm.nii.gz",
        "example_seg_mr.nii.gz",
        "pulmonary_ct_cropped.nii.gz",
        "pulmonary_artery_seg.nii.gz",
        "example_ct_dicom",
        "example_seg_dicom.nii.gz",
    ):
        _link(volumes / "totalsegmentator" / name, root / "totalsegmentator" / name)
    cache = tmp_path_factory.mktemp("cache")
    return VolumeFolder(root, PRE, cache_dir=cache, include_labels=True, progress=False)


def _pairs(folder: VolumeFolder, subfolder: str) -> set[tuple[str, str]]:
    base = folder.root / subfolder
    return {
        (p.image.relative_to(base).as_posix(), p.label.relative_to(base).as_posix())
        for p in pair_label_maps(folder)
        if base in p.label.parents
    }


def test_brats_label_maps_pair_with_both_sequences(scanned: VolumeFolder):
    assert _pairs(scanned, "brats") == {
        (image, label)
        for image in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")
        for label in ("OTMultiClass.nii.gz", "brainmask.nii.gz")
    }


def test_brats_float32_label_maps_are_never_pretraining_input(
    scanned: VolumeFolder, tmp_path: Path
):
    base = scanned.root / "brats"
    here = [e for e in scanned.manifest if base in Path(e.source).parents]
    kinds = {Path(e.source).name: e.kind for e in here}
    assert kinds == {
        "Flair_subtrMeanDivStd.nii.gz": "image",
        "T1c_subtrMeanDivStd.nii.gz": "image",
        "OTMultiClass.nii.gz": "label",
        "brainmask.nii.gz": "label",
    }
    assert nib.load(base / "OTMultiClass.nii.gz").get_data_dtype() == np.float32
    modalities = {Path(e.source).name: e.modality for e in scanned.manifest if e.kind == "image"}
    assert modalities["T1c_subtrMeanDivStd.nii.gz"] == "MR"
    # The default scan (what pretraining uses) serves the two MR images only.
    images = VolumeFolder(base, PRE, cache_dir=tmp_path / "cache", progress=False)
    assert sorted(Path(images[i]["id"]).name for i in range(len(images))) == [
        "Flair_subtrMeanDivStd.nii.gz",
        "T1c_subtrMeanDivStd.nii.gz",
    ]


def test_pyradiomics_pairs_by_case(scanned: VolumeFolder):
    assert _pairs(scanned, "pyradiomics") == {
        ("brain1_image.nrrd", "brain1_label.nrrd"),
        ("brain2_image.nrrd", "brain2_label.nrrd"),
        ("breast1_image.nrrd", "breast1_label.nrrd"),
        ("prostate_phantom_subvolume.nrrd", "prostate_phantom_subvolume-label.nrrd"),
    }


def test_nrrd_label_maps_load_as_labels(scanned: VolumeFolder, volumes: Path):
    kinds = {Path(e.source).name: e.kind for e in scanned.manifest if e.source.endswith(".nrrd")}
    for name, kind in kinds.items():
        assert kind == ("label" if "seg" in name or "label" in name else "image"), name
    assert len(kinds) == 13
    phantom = read_label_map(volumes / "pyradiomics/prostate_phantom_subvolume-label.nrrd")
    assert set(np.unique(phantom.array).tolist()) == {0, 1, 7, 8, 9}
    liver_spine = read_label_map(volumes / "dcmqi/liver_spine_seg.nrrd")
    assert set(np.unique(liver_spine.array).tolist()) == {0, 1, 2}


def test_dcmqi_series_pairs_with_the_label_maps_beside_its_folder(scanned: VolumeFolder):
    pairs = _pairs(scanned, "dcmqi")
    assert pairs == {
        ("ct-3slice", f"{organ}_seg.nrrd") for organ in ("heart", "liver", "liver_spine", "spine")
    }
    series = [p for p in pair_label_maps(scanned) if p.image.name == "ct-3slice"]
    assert all(p.series_uid for p in series)
    assert series[0].image_id == f"{series[0].image}#{series[0].series_uid}"


def test_totalsegmentator_pairs(scanned: VolumeFolder):
    assert _pairs(scanned, "totalsegmentator") == {
        ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
        ("example_ct_sm.nii.gz", "example_seg_fast.nii.gz"),
        ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz"),
        ("pulmonary_ct_cropped.nii.gz", "pulmonary_artery_seg.nii.gz"),
        ("example_ct_dicom", "example_seg_dicom.nii.gz"),
    }


def test_monai_crops_pair_only_with_their_own_label(scanned: VolumeFolder):
    assert _pairs(scanned, "monai") == {
        ("anatomical.nii", "anatomical_label.nii.gz"),
        ("reoriented_anat_moved.nii", "reoriented_anat_moved_label.nii.gz"),
    }


def test_summary_counts_the_pairs(scanned: VolumeFolder):
    n = len(pair_label_maps(scanned))
    assert n == 4 + 4 + 4 + 5 + 2
    assert f"({n} image/label-map pairs)" in scanned.summary()


def test_pairs_feed_labeled_volumes(scanned: VolumeFolder):
    pairs = [p for p in pair_label_maps(scanned) if p.image.name == "ct-3slice"][:1]
    ds = LabeledVolumes(pairs, preprocessing=Preprocessing(spacing=None))
    item = ds[0]
    assert item["image"].shape == item["label"].shape == (1, 512, 512, 3)
    assert item["modality"] == "CT"


def test_pair_label_maps_scans_a_root(volumes: Path, tmp_path: Path):
    root = tmp_path / "monai"
    _link(volumes / "monai/anatomical.nii", root / "anatomical.nii")
    _link(volumes / "monai/anatomical_label.nii.gz", root / "anatomical_label.nii.gz")
    pairs = pair_label_maps(root, preprocessing=PRE, cache_dir=tmp_path / "cache")
    assert pairs == [LabelPair(root / "anatomical.nii", root / "anatomical_label.nii.gz")]


# ---------------------------------------------------------------- bad pairs, one test each


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "omnienc" and r.levelno >= logging.WARNING
    ]


def test_label_map_of_another_case_is_reported_not_paired(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "case"
    root.mkdir()
    image = root / "brain1_image.nrrd"
    label = root / "brain1_label.nrrd"
    shutil.copyfile(volumes / "pyradiomics/brain1_image.nrrd", image)
    shutil.copyfile(volumes / "pyradiomics/brain2_label.nrrd", label)  # 23 slices, not 25
    folder = VolumeFolder(root, PRE, cache_dir=tmp_path / "cache", progress=False)
    caplog.set_level(logging.WARNING, logger="omnienc")
    assert pair_label_maps(folder) == []
    (warning,) = _warnings(caplog)
    assert str(label) in warning and str(image) in warning
    assert "(256, 256, 23) differs from (256, 256, 25)" in warning
    with pytest.raises(DataError, match="not paired with the image beside it") as exc:
        pair_label_maps(folder, strict=True)
    assert str(label) in str(exc.value) and str(image) in str(exc.value)


def test_shifted_label_map_is_reported_not_paired(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "crop"
    root.mkdir()
    image = root / "anatomical.nii"
    shutil.copyfile(volumes / "monai/anatomical.nii", image)
    src = nib.load(volumes / "monai/anatomical_label.nii.gz")
    affine = src.affine.copy()
    affine[:3, 3] += (5.0, 0.0, 0.0)
    label = root / "mask.nii.gz"  # a different name: the shape says it is meant for the image
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), affine), label)
    folder = VolumeFolder(root, PRE, cache_dir=tmp_path / "cache", progress=False)
    caplog.set_level(logging.WARNING, logger="omnienc")
    assert pair_label_maps(folder) == []
    (warning,) = _warnings(caplog)
    assert str(label) in warning and str(image) in warning
    assert "affines differ by up to 5" in warning


def test_unrelated_label_map_is_not_paired_and_not_reported(scanned: VolumeFolder):
    # An atlas beside images on other grids (spm12's labels_Neuromorphometrics beside its
    # templates) is neither paired nor a problem: here a TotalSegmentator map moved in thought
    # into the pyradiomics folder.
    entries = list(scanned.manifest)
    seg = next(e for e in entries if e.source.endswith("example_seg_mr.nii.gz"))
    images = [e for e in entries if e.kind == "image" and "pyradiomics" in e.source]
    atlas = replace(seg, source=str(Path(images[0].source).parent / "atlas_labels.nii"))
    assert find_pairs([*images, atlas]) == ([], [])


def test_float_label_map_with_fractional_values(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A BraTS tumour-label crop resampled with linear interpolation: 0.5 between 0 and 1."""
    src = nib.load(volumes / BRATS_CASE / "OTMultiClass.nii.gz")
    labels = np.asarray(src.dataobj[60:180, 60:180, 40:100], dtype=np.float32)
    labels[labels > 0] -= 0.5
    root = tmp_path / "soft"
    root.mkdir()
    bad = root / "tumour_seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, src.affine), bad)
    with pytest.raises(DataError, match="non-integer voxels") as exc:
        read_label_map(bad)
    assert str(bad) in str(exc.value)
    shutil.copyfile(volumes / "monai/anatomical.nii", root / "anatomical.nii")
    caplog.set_level(logging.WARNING, logger="omnienc")
    folder = VolumeFolder(root, PRE, cache_dir=tmp_path / "cache", progress=False)
    (warning,) = _warnings(caplog)
    assert str(bad) in warning and "named like a label map" in warning
    assert "non-integer values" in warning
    assert [s for s, _ in folder.skipped] == [str(bad)]
    assert [Path(e.source).name for e in folder.entries] == ["anatomical.nii"]
