"""DICOM series folders and multi-frame DICOM files through SimpleITK/GDCM.

GDCM also decodes JPEG 2000 pixel data and applies every file's RescaleSlope/RescaleIntercept (a
series is read as float32, so that slices with fractional slopes are not truncated). A single
2D DICOM slice is not a volume: it is refused
(:func:`omnienc.io.dicom_header.read_dicom_slice` reads one). DICOM headers, units and slice
geometry are in :mod:`omnienc.io.dicom_header`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from omnienc.errors import VolumeReadError
from omnienc.io.dicom_header import (
    DicomHeader,
    check_slice_spacing,
    header_from_itk,
)
from omnienc.io.sitk_formats import _itk_message, _read_sitk_file, _sitk_to_ras_arrays
from omnienc.io.volume import _check_size, _select_3d, is_volume_path


def list_dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """DICOM series in ``folder`` (not recursive): ``[(series_uid, [file, ...]), ...]``."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    return [
        (uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))) for uid in ids
    ]


def _read_dicom_folder(
    folder: Path, series_uid: str | None, frame: int | None, max_voxels: int
) -> tuple[np.ndarray, np.ndarray, DicomHeader | None]:
    series = list_dicom_series(folder)
    if not series:
        others = sum(1 for p in folder.iterdir() if is_volume_path(p))
        hint = (
            f"; it holds {others} other volume file(s): read_volume reads one file or one DICOM "
            "series folder (scan a folder of volumes with VolumeFolder or `omnienc info DIR`)"
            if others
            else ""
        )
        raise VolumeReadError(folder, "folder holds no readable DICOM series" + hint)
    if series_uid is not None:
        series = [s for s in series if s[0] == series_uid]
        if not series:
            raise VolumeReadError(folder, f"no DICOM series with SeriesInstanceUID {series_uid}")
    if len(series) > 1:
        uids = ", ".join(f"{uid or '(no uid)'} ({len(f)} files)" for uid, f in series)
        raise VolumeReadError(
            folder,
            f"mixed DICOM series: the folder holds {len(series)} series [{uids}]; "
            "pass series_uid= or give each series its own folder",
        )
    files = series[0][1]
    if len(files) == 1:
        return _read_sitk_file(Path(files[0]), frame, max_voxels)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(Path(files[0]), f"unreadable DICOM ({_itk_message(exc)})") from exc
    w, h = first.GetSize()[:2]
    _check_size((w, h, len(files)), folder, max_voxels)
    header = header_from_itk(first, files[0])
    check_slice_spacing(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # Every slice is rescaled with its own slope (PET); float32 keeps them all, where the first
    # slice's pixel type (an integer one if its slope is 1) would truncate the others.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeReadError(folder, f"DICOM series unreadable ({_itk_message(exc)})") from exc
    array, affine = _sitk_to_ras_arrays(image, folder)
    return _select_3d(array, folder, frame), affine, header
