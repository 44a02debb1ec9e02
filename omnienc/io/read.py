""":func:`read_volume`, which dispatches to the reader of a format family, and :func:`write_volume`.

The modality comes from a DICOM header, else from the file name, else from the intensities
(:func:`infer_modality`).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from omnienc.atomic import atomic_target
from omnienc.errors import VolumeReadError
from omnienc.io.checks import check_readable
from omnienc.io.dicom import _read_dicom_folder
from omnienc.io.dicom_header import (
    DicomHeader,
)
from omnienc.io.nifti import _read_nibabel
from omnienc.io.sitk_formats import _read_sitk_file
from omnienc.io.volume import (
    DEFAULT_MAX_VOXELS,
    NIBABEL_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Volume,
    _check_finite,
    _to_ras,
    file_suffix,
    spacing_from_affine,
)
from omnienc.preprocessing import MODALITIES

# BIDS-style and common name tokens that state the modality outright (see infer_modality).
_NAME_TOKENS = {
    "CT": ("ct",),
    "PET": ("pet", "transm"),
    "SPECT": ("spect",),
    "MR": (
        "mr",
        "mri",
        "t1",
        "t1w",
        "t1c",
        "t1ce",
        "t1gd",
        "t2",
        "t2w",
        "flair",
        "pd",
        "pdw",
        "dwi",
        "bold",
        "asl",
        "mra",
        "epi",
        "func",
    ),
}


def infer_modality(array: np.ndarray, path: Path) -> tuple[str, str]:
    """Guess the modality of a non-DICOM volume from its name, then its intensities.

    Rules, in order: a name token between separators states it; a minimum at air in Hounsfield
    units (-900 or below, not beyond -3100) together with a maximum above 200 is CT; otherwise
    ``unknown`` (raw MR and PET intensities and rescaled CT look alike, so omnienc does not
    guess). The tokens, case-insensitive, checked in this order:

    - CT: ``ct``.
    - PET: ``pet``; ``transm`` (a PET transmission scan for attenuation correction, e.g. SPM's
      ``Transm.nii`` template).
    - SPECT: ``spect``.
    - MR: ``mr``, ``mri``; ``t1``, ``t1w``, ``t2``, ``t2w``, ``pd``, ``pdw`` (BIDS anatomical
      suffixes); ``t1c``, ``t1ce``, ``t1gd`` (contrast-enhanced T1 as BraTS names it:
      ``T1c_subtrMeanDivStd``, ``t1ce``, ``T1Gd``); ``flair``; ``dwi``; ``bold``, ``func``,
      ``epi`` (functional); ``asl``; ``mra``.

    Returns:
        ``(modality, source)``, source being ``filename``, ``intensity`` or ``none``.
    """
    tokens = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    for modality, names in _NAME_TOKENS.items():
        if tokens & set(names):
            return modality, "filename"
    lo, hi = float(array.min()), float(array.max())
    if -3100.0 <= lo <= -900.0 and hi >= 200.0:
        return "CT", "intensity"
    return "unknown", "none"


def read_volume(
    path: str | Path,
    modality: str | None = None,
    *,
    frame: int | None = None,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read a 3D volume in canonical RAS+ order.

    Args:
        path: A volume file, or a folder holding one DICOM series.
        modality: ``CT``, ``MR``, ``PET``, ``SPECT`` or ``unknown`` to state it; ``None`` infers it
            from the DICOM Modality tag (PT is PET, NM is SPECT), the format (ECAT is PET), the
            file name (:func:`infer_modality`), or the intensity range.
        frame: Which frame of a 4D file to read. 4D files without it are an error.
        series_uid: Which series of a DICOM folder holding several.
        max_voxels: Largest voxel count a header may declare; checked before allocating.

    Returns:
        The :class:`Volume`.

    Raises:
        VolumeReadError: Missing, empty, unreadable (permissions, symbolic link loops, dangling
            links), truncated or corrupt files (gzip CRC checked), misnamed or unsupported
            formats, non-3D data (a single 2D DICOM slice among them), non-finite voxels,
            oversized headers, mixed DICOM series.

    A DICOM series whose slices are not evenly spaced is read on a regular grid at the mean
    gap, with a warning naming the folder and the gaps
    (:func:`omnienc.io.dicom_header.check_slice_spacing`).
    """
    path = Path(path)
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    check_readable(path)
    header: DicomHeader | None = None
    if path.is_dir():
        array, affine, header = _read_dicom_folder(path, series_uid, frame, max_voxels)
    else:
        suffix = file_suffix(path)
        if suffix not in SUPPORTED_SUFFIXES:
            raise VolumeReadError(
                path,
                f"unsupported file type {suffix or '(no suffix)'!r}; omnienc reads "
                + ", ".join(SUPPORTED_SUFFIXES)
                + " and DICOM folders",
            )
        if path.stat().st_size == 0:
            raise VolumeReadError(path, "empty file (0 bytes)")
        if suffix in NIBABEL_SUFFIXES:
            array, affine = _read_nibabel(path, frame, max_voxels)
        else:
            array, affine, header = _read_sitk_file(path, frame, max_voxels)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        rows = "; ".join(" ".join(f"{v:.4g}" for v in row) for row in affine)
        raise VolumeReadError(path, f"degenerate voxel-to-world affine [{rows}]")
    array = np.asarray(array, dtype=np.float32)
    _check_finite(array, path)
    array, affine = _to_ras(array, affine)
    array = np.ascontiguousarray(array)
    if modality is not None:
        source = "given"
    elif header is not None and header.volume_modality is not None:
        modality, source = header.volume_modality, "dicom"
    elif not path.is_dir() and file_suffix(path) == ".v":
        modality, source = "PET", "format"
    else:
        modality, source = infer_modality(array, path)
    return Volume(
        array=array,
        affine=affine,
        spacing=spacing_from_affine(affine),
        modality=modality,
        modality_source=source,
        source=path,
        units=header.units if header is not None else None,
    )


def write_volume(
    volume: Volume | np.ndarray,
    path: str | Path,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write a volume as NIfTI (``.nii`` or ``.nii.gz``), atomically.

    Args:
        volume: A :class:`Volume`, or an ``(X, Y, Z)`` array together with ``affine``.
        path: Output file; its suffix must be ``.nii`` or ``.nii.gz``.
        affine: ``(4, 4)`` voxel-to-RAS matrix when ``volume`` is an array.
        dtype: On-disk data type (e.g. ``np.uint8`` for label maps); float32 by default.

    Returns:
        ``path``.
    """
    path = Path(path)
    if file_suffix(path) not in (".nii", ".nii.gz"):
        raise VolumeReadError(path, "write_volume writes NIfTI only: use .nii or .nii.gz")
    if isinstance(volume, Volume):
        array, affine = volume.array, volume.affine
    else:
        if affine is None:
            raise ValueError("write_volume needs affine= when given a bare array")
        array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"write_volume expects a 3D array, got shape {array.shape}")
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    img = nib.Nifti1Image(np.asarray(array).astype(out_dtype), np.asarray(affine, np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_target(path, suffix=file_suffix(path)) as tmp:
        nib.save(img, tmp)
    return path
