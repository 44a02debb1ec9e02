"""MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) volumes through SimpleITK.

Also the SimpleITK image -> RAS array conversion the DICOM reader shares.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from omnienc.errors import VolumeReadError
from omnienc.io.checks import _misnamed, _sniff
from omnienc.io.dicom_header import (
    DicomHeader,
    header_from_itk,
    plain_dicom,
    single_slice_problem,
)
from omnienc.io.volume import DICOM_SUFFIXES, _check_size, _select_3d, file_suffix

logger = logging.getLogger("omnienc")

# SimpleITK prints ITK warnings (e.g. "No Series were found") straight to stderr; we raise instead.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

# (1, 1, 1) -> identity: flips LPS (ITK's world) to RAS (nibabel's world).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sitk_to_ras_arrays(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array indexed (i, j, k[, t]), RAS affine)."""
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeReadError(path, "has vector pixels (e.g. RGB); omnienc expects scalar volumes")
    array = sitk.GetArrayFromImage(image)  # (k, j, i) or (t, k, j, i)
    array = np.transpose(array, tuple(range(dim - 1, -1, -1)))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = origin
    return array, _LPS_TO_RAS @ affine


def _sitk_size_check(reader: sitk.ImageFileReader, path: Path, max_voxels: int) -> None:
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        hint = _misnamed(path)
        if not hint and _sniff(path) == "a DICOM file":
            hint = "; the file starts like DICOM, so it is probably truncated or corrupt"
        raise VolumeReadError(path, f"unreadable header ({_itk_message(exc)}){hint}") from exc
    _check_size(tuple(reader.GetSize()), path, max_voxels)


def _itk_message(exc: Exception) -> str:
    """The useful last line of an ITK exception, without its C++ file/line noise."""
    useful = []
    for ln in (ln.strip() for ln in str(exc).splitlines()):
        if not ln or ln.startswith("Exception thrown in SimpleITK") or "line " in ln[:60]:
            continue
        if re.match(r"^\S+\.(cxx|hxx|txx|h):\d+", ln):
            continue
        useful.append(re.sub(r"^((s?itk|ITK)::\w+:?\s*)+(\w+\(0x[0-9a-f]+\):\s*)?", "", ln))
    return re.sub(r"\s+", " ", useful[-1] if useful else str(exc))[:300]


_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _check_metaimage(path: Path, max_voxels: int) -> None:
    """Check an uncompressed one-file MetaImage's size before ITK reads it.

    ITK's MetaIO reader prints "data not read completely" to the terminal for a short file;
    this check names the file and the shortfall instead. Headers it does not follow (data in
    another file, compressed data) are left to ITK.
    """
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    fields: dict[str, str] = {}
    offset = None
    pos = 0
    for line in head.split(b"\n"):
        pos += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            offset = pos
            break
    if offset is None or fields.get("ElementDataFile") != "LOCAL":
        return
    actual = path.stat().st_size - offset
    try:
        dims = tuple(int(v) for v in fields["DimSize"].split())
        _check_size(dims, path, max_voxels)
        if fields.get("CompressedData", "False").lower() == "true":
            expected = int(fields["CompressedDataSize"])
            what = "compressed bytes"
        else:
            itemsize = _MET_BYTES[fields["ElementType"]]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            expected = int(np.prod(dims, dtype=np.float64)) * itemsize * channels
            what = f"bytes of voxels ({fields['DimSize']} {fields['ElementType']})"
    except (KeyError, ValueError):
        return
    if actual < expected:
        raise VolumeReadError(
            path, f"truncated: header promises {expected:,} {what}, the file has {actual:,}"
        )


def _read_sitk_file(
    path: Path, frame: int | None, max_voxels: int
) -> tuple[np.ndarray, np.ndarray, DicomHeader | None]:
    """Read a SimpleITK-format file; for DICOM also its header, and refuse a single 2D slice."""
    if file_suffix(path) == ".mha":
        _check_metaimage(path, max_voxels)
    is_dicom = file_suffix(path) in DICOM_SUFFIXES
    with plain_dicom(path) as readable:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(readable))
        _sitk_size_check(reader, path, max_voxels)
        header = header_from_itk(reader, path) if is_dicom else None
        if is_dicom:
            reader.SetOutputPixelType(sitk.sitkFloat32)  # rescaled values, not truncated
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise VolumeReadError(
                path, f"truncated or corrupt voxel data ({_itk_message(exc)})"
            ) from exc
    array, affine = _sitk_to_ras_arrays(image, path)
    # Checked after decoding, so that a damaged slice is reported as damaged first.
    if header is not None and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)):
        raise VolumeReadError(path, single_slice_problem(header))
    return _select_3d(array, path, frame), affine, header
