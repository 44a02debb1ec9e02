"""VolumeFolder over small tmp folders of real files: manifest, skipping, caching, bad inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import omnienc.data.folder as folder_module
from omnienc.data.folder import VolumeFolder, find_volume_sources, is_label_map
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

MR_IMAGE = "totalsegmentator/example_mr_sm.nii.gz"
MR_LABEL = "totalsegmentator/example_seg_mr.nii.gz"
BRAIN = "nibabel/anatomical.nii"
SERIES = "niivue/dicom"  # three DICOM files of one series
FOUR_D = "nibabel/example4d.nii.gz"
# Coarse and uncropped: the pipeline is tested in test_transforms.py, here it only has to run.
PRE = Preprocessing(spacing=(4.0, 4.0, 4.0))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "omnienc" and r.levelno >= logging.WARNING
    ]


def _truncated_copy(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[: len(data) // 2])
    return dest


def _folder(root: Path, cache: Path, **kwargs) -> VolumeFolder:
    kwargs.setdefault("preprocessing", PRE)
    return VolumeFolder(root, cache_dir=cache, progress=False, **kwargs)


@pytest.fixture
def mixed(tmp_path: Path, volumes: Path, copy_real) -> Path:
    """root/ with mr/ (image + label), brain/, dicom/ (one series), bad/broken.nii.gz, README."""
    root = tmp_path / "root"
    copy_real(MR_IMAGE, MR_LABEL, dest=root / "mr")
    copy_real(BRAIN, dest=root / "brain")
    copy_real(SERIES, dest=root)  # -> root/dicom
    _truncated_copy(volumes / MR_IMAGE, root / "bad" / "broken.nii.gz")
    (root / "README.txt").write_text("not a volume\n")
    return root


def _one_volume(tmp_path: Path, copy_real) -> Path:
    root = tmp_path / "one"
    copy_real(BRAIN, dest=root)
    return root


def test_manifest_lists_each_volume_once_and_skips_the_bad_file(
    mixed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="omnienc")
    ds = _folder(mixed, tmp_path / "cache")
    by_source = {Path(e.source).relative_to(mixed).as_posix(): e for e in ds.manifest}
    assert set(by_source) == {
        "brain/anatomical.nii",
        "dicom",
        "mr/example_mr_sm.nii.gz",
        "mr/example_seg_mr.nii.gz",
    }
    series = by_source["dicom"]
    assert series.series_uid and series.shape == (512, 512, 3)
    assert series.modality == "MR" and series.modality_source == "dicom"
    assert by_source["mr/example_seg_mr.nii.gz"].kind == "label"
    assert {e.kind for k, e in by_source.items() if k != "mr/example_seg_mr.nii.gz"} == {"image"}

    broken = str(mixed / "bad" / "broken.nii.gz")
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and broken in warnings[0], warnings
    assert [s for s, _ in ds.skipped] == [broken]
    assert "truncated" in ds.skipped[0][1]

    summary = ds.summary()
    assert str(mixed) in summary
    for part in (
        "4 volumes read",
        "3 used",
        "1 label maps",
        "1 unreadable skipped",
        "1 other files ignored",
    ):
        assert part in summary, summary
    assert len(ds.manifest_rows()) == 4


def test_label_maps_are_served_only_when_asked(mixed: Path, tmp_path: Path):
    label = str(mixed / "mr" / "example_seg_mr.nii.gz")
    without = _folder(mixed, tmp_path / "cache")
    assert len(without) == 3
    assert label not in {without[i]["id"] for i in range(len(without))}
    with_labels = _folder(mixed, tmp_path / "cache", include_labels=True)
    assert len(with_labels) == 4
    assert label in {with_labels[i]["id"] for i in range(len(with_labels))}


def test_items_are_channel_first_float32_with_string_ids(mixed: Path, tmp_path: Path):
    ds = _folder(mixed, tmp_path / "cache")
    for i in range(len(ds)):
        item = ds[i]
        image = item["image"]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert image.ndim == 4 and image.shape[0] == 1
        assert tuple(image.shape[1:]) == ds.entries[i].preprocessed_shape
        assert item["affine"].shape == (4, 4)
        assert isinstance(item["id"], str) and isinstance(item["modality"], str)
    ids = {ds[i]["id"] for i in range(len(ds))}
    series = next(e for e in ds.entries if e.series_uid)
    assert f"{mixed / 'dicom'}#{series.series_uid}" in ids


def test_second_construction_is_served_from_cache(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    first = _folder(mixed, cache)
    files = sorted(os.listdir(cache))
    read: list[Path] = []

    def no_reading(path, *args, **kwargs):
        read.append(Path(path))
        raise RuntimeError("read_volume called although the volume is cached")

    monkeypatch.setattr(folder_module, "read_volume", no_reading)
    second = _folder(mixed, cache)
    # Only the truncated file, which was never cached, is read (and refused) again.
    assert read == [mixed / "bad" / "broken.nii.gz"]
    assert len(second.skipped) == 1
    assert sorted(os.listdir(cache)) == files
    assert [e.source for e in second.entries] == [e.source for e in first.entries]
    for i in range(len(first)):
        torch.testing.assert_close(second[i]["image"], first[i]["image"], rtol=0, atol=0)


def test_changed_preprocessing_makes_new_cache_files(tmp_path: Path, copy_real):
    root, cache = _one_volume(tmp_path, copy_real), tmp_path / "cache"
    a = _folder(root, cache, preprocessing=Preprocessing(spacing=(4.0, 4.0, 4.0)))
    b = _folder(root, cache, preprocessing=Preprocessing(spacing=(3.0, 3.0, 3.0)))
    assert a.entries[0].cache_file != b.entries[0].cache_file
    assert len(os.listdir(cache)) == 2
    assert a[0]["image"].shape != b[0]["image"].shape


def test_corrupt_cache_file_is_rebuilt_with_a_warning(
    tmp_path: Path, copy_real, caplog: pytest.LogCaptureFixture
):
    root, cache = _one_volume(tmp_path, copy_real), tmp_path / "cache"
    first = _folder(root, cache)
    expected = first[0]["image"]
    cache_file = Path(first.entries[0].cache_file)
    cache_file.write_bytes(b"garbage, not an npz file" * 10)
    caplog.set_level(logging.WARNING, logger="omnienc")
    again = _folder(root, cache)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(cache_file) in warnings[0] and "corrupt" in warnings[0]
    torch.testing.assert_close(again[0]["image"], expected, rtol=0, atol=0)
    with np.load(cache_file) as z:  # rewritten in place
        assert z["image"].shape == tuple(expected.shape)


def test_cache_file_with_damaged_image_is_rebuilt(tmp_path: Path, copy_real):
    root, cache = _one_volume(tmp_path, copy_real), tmp_path / "cache"
    first = _folder(root, cache)
    expected = first[0]["image"]
    cache_file = Path(first.entries[0].cache_file)
    data = bytearray(cache_file.read_bytes())
    middle = len(data) // 2  # inside image.npy, the first and largest member
    data[middle : middle + 64] = b"\xff" * 64
    cache_file.write_bytes(bytes(data))
    again = _folder(root, cache)
    torch.testing.assert_close(again[0]["image"], expected, rtol=0, atol=0)


def test_cache_leaves_no_temporary_files(mixed: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    ds = _folder(mixed, cache, include_labels=True)
    names = os.listdir(cache)  # also lists hidden .*.tmp files
    assert not [n for n in names if ".tmp" in n], names
    assert sorted(names) == sorted(Path(e.cache_file).name for e in ds.manifest)


def test_empty_folder_is_an_error_naming_it(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable volume") as info:
        _folder(empty, tmp_path / "cache")
    assert str(empty) in str(info.value)


def test_missing_folder_is_an_error_naming_it(tmp_path: Path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError, match="no such folder") as info:
        _folder(missing, tmp_path / "cache")
    assert str(missing) in str(info.value)


def test_file_instead_of_folder_is_an_error_naming_it(tmp_path: Path, copy_real):
    (file,) = copy_real(BRAIN)
    with pytest.raises(DataError, match="is a file") as info:
        _folder(file, tmp_path / "cache")
    assert str(file) in str(info.value)


def test_folder_of_only_bad_files_reports_the_summary(tmp_path: Path, volumes: Path):
    root = tmp_path / "bad"
    _truncated_copy(volumes / MR_IMAGE, root / "broken.nii.gz")
    (root / "empty.nii").write_bytes(b"")
    (root / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        _folder(root, tmp_path / "cache")
    message = str(info.value)
    assert str(root) in message
    assert "0 volumes read, 0 used" in message
    assert "2 unreadable skipped" in message and "1 other files ignored" in message


def test_4d_file_is_skipped_without_frame_and_used_with_frame_0(
    tmp_path: Path, copy_real, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "fmri"
    (four_d,) = copy_real(FOUR_D, dest=root)
    copy_real(BRAIN, dest=root)
    caplog.set_level(logging.WARNING, logger="omnienc")
    ds = _folder(root, tmp_path / "cache")
    assert [s for s, _ in ds.skipped] == [str(four_d)]
    assert "4D" in ds.skipped[0][1] and "frame" in ds.skipped[0][1]
    assert any(str(four_d) in w for w in _warnings(caplog))
    assert len(ds) == 1

    framed = _folder(root, tmp_path / "cache", frame=0)
    assert not framed.skipped
    assert {e.source for e in framed.entries} == {str(four_d), str(root / "anatomical.nii")}
    entry = next(e for e in framed.entries if e.source == str(four_d))
    assert entry.shape == (128, 96, 24)


def test_symlink_loop_neither_hangs_nor_duplicates(tmp_path: Path, copy_real):
    root = _one_volume(tmp_path, copy_real)
    os.symlink(root, root / "loop")
    sources, _ = find_volume_sources(root)
    assert sources == [folder_module.VolumeSource(root / "anatomical.nii")]
    ds = _folder(root, tmp_path / "cache")
    assert [e.source for e in ds.manifest] == [str(root / "anatomical.nii")]


def test_constant_volume_is_skipped_with_a_warning(
    tmp_path: Path, copy_real, caplog: pytest.LogCaptureFixture
):
    root = _one_volume(tmp_path, copy_real)
    ones = root / "ones.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), ones)
    caplog.set_level(logging.WARNING, logger="omnienc")
    ds = _folder(root, tmp_path / "cache")
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(ones) in warnings[0] and "constant" in warnings[0]
    assert [s for s, _ in ds.skipped] == [str(ones)]
    assert [e.source for e in ds.manifest] == [str(root / "anatomical.nii")]


def test_is_label_map_on_real_files(volumes: Path):
    from omnienc.io import read_volume

    seg = read_volume(volumes / MR_LABEL)
    image = read_volume(volumes / MR_IMAGE)
    assert is_label_map(seg.array, seg.source)
    assert not is_label_map(image.array, image.source)


def test_float_brats_label_maps_are_label_maps(volumes: Path):
    """BraTS label maps are float volumes holding integers; its images are z-scores.

    OTMultiClass (0..4) is stored as float32; brainmask as int32 scaled by scl_slope 2^-32 and
    scl_inter 0.5 (float values 0 and 0.99999997, exactly 0 and 1 in float32, as SimpleITK and
    read_volume return them).
    """
    import nibabel as nib

    case = volumes / "brats/brats_2013_pat0005_1"
    assert nib.load(case / "OTMultiClass.nii.gz").get_data_dtype() == np.float32
    mask = nib.load(case / "brainmask.nii.gz")
    assert (mask.dataobj.slope, mask.dataobj.inter) == (pytest.approx(2.0**-32), 0.5)
    box = np.s_[50:190, 24:192, 40:100]
    for name, kind in (
        ("OTMultiClass.nii.gz", "label"),
        ("brainmask.nii.gz", "label"),
        ("Flair_subtrMeanDivStd.nii.gz", "image"),
        ("T1c_subtrMeanDivStd.nii.gz", "image"),
    ):
        crop = np.asarray(nib.load(case / name).dataobj[box], dtype=np.float32)
        assert is_label_map(crop, case / name) == (kind == "label"), name
