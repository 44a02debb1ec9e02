"""DICOM headers, single slices and slice geometry, beside :func:`omnienc.io.read_volume`.

:func:`omnienc.io.read_volume` decodes DICOM voxels through SimpleITK/GDCM, which applies each
file's RescaleSlope/RescaleIntercept. This module holds the DICOM-specific rest:

- :func:`read_dicom_header` reads one file's header with pydicom into a small
  :class:`DicomHeader` (modality, units, rescale, pixel spacing, slice thickness, size);
  :func:`header_from_itk` builds the same from a SimpleITK reader, so both read paths agree.
- :func:`read_dicom_slice` reads one 2D slice, rescaled to its stored units, for inspection:
  ``read_volume`` refuses single slices (:func:`single_slice_problem` says why).
- :func:`check_slice_spacing` measures a series' slice positions along the slice normal and warns
  (omnienc logger, naming the series folder) when the gaps between slices are not uniform, since
  SimpleITK then places every slice on a regular grid at the mean gap.

Every problem raises :class:`~omnienc.errors.VolumeReadError` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from omnienc.errors import VolumeReadError

logger = logging.getLogger("omnienc")

# DICOM Modality codes -> omnienc modalities. NM (nuclear medicine) is how SPECT is stored.
_DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "PT": "PET", "PET": "PET", "NM": "SPECT"}
# Gaps between neighbouring slices may differ by this fraction of the mean gap (plus rounding of
# the positions in the header) before a series counts as non-uniformly sampled.
SPACING_REL_TOLERANCE = 1e-3
_SPACING_ABS_TOLERANCE = 1e-4  # mm

# A tag lookup: "gggg|eeee" -> the value as DICOM writes it ("a\\b" for several), or None.
TagLookup = Callable[[str], str | None]


def modality_from_dicom(code: str) -> str | None:
    """The omnienc modality of a DICOM Modality code: CT, MR, PT -> PET, NM -> SPECT, else None."""
    return _DICOM_MODALITIES.get(code.strip().upper())


@dataclass(frozen=True)
class DicomHeader:
    """What omnienc reads from one DICOM file's header.

    Attributes:
        path: The file.
        modality: The Modality tag as stored (``CT``, ``MR``, ``PT``, ``NM``, ...); ``""`` if
            absent.
        units: Units of the rescaled pixel values: the PET Units tag (``BQML``, ``CNTS``, ``GML``,
            ...), else a Rescale Type other than ``US`` (unspecified), else ``HU`` for CT, else
            ``None``.
        rescale_slope: RescaleSlope (1 when absent).
        rescale_intercept: RescaleIntercept (0 when absent).
        pixel_spacing: ``(between rows, between columns)`` in mm, or ``None``.
        slice_thickness: SliceThickness in mm, or ``None``.
        spacing_between_slices: SpacingBetweenSlices in mm as stored, or ``None`` (some vendors
            store the gap between slices here, not the distance between their centres).
        rows: Rows (image height in pixels).
        columns: Columns (image width in pixels).
        number_of_frames: NumberOfFrames (1 when absent: a single 2D slice).
        series_uid: SeriesInstanceUID, ``""`` if absent.
        image_position: ImagePositionPatient (LPS, mm), or ``None``.
        image_orientation: ImageOrientationPatient (row then column direction cosines), or
            ``None``.
    """

    path: Path
    modality: str
    units: str | None
    rescale_slope: float
    rescale_intercept: float
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    rows: int
    columns: int
    number_of_frames: int
    series_uid: str
    image_position: tuple[float, ...] | None
    image_orientation: tuple[float, ...] | None

    @property
    def volume_modality(self) -> str | None:
        """``CT``, ``MR``, ``PET`` or ``SPECT`` (see :func:`modality_from_dicom`), else ``None``."""
        return modality_from_dicom(self.modality)

    @property
    def is_single_slice(self) -> bool:
        """Whether the file holds one 2D frame."""
        return self.number_of_frames <= 1

    def describe(self) -> str:
        """A short description, e.g. ``PT, 168x168, Units BQML`` (columns x rows)."""
        text = f"{self.modality or 'no Modality'}, {self.columns}x{self.rows}"
        return text + (f", Units {self.units}" if self.units else "")

    @classmethod
    def from_tags(cls, path: str | Path, lookup: TagLookup) -> DicomHeader:
        """Build a header from a tag lookup (pydicom or SimpleITK, see the readers below).

        Raises:
            VolumeReadError: Rows or Columns missing, or a numeric tag that is not a number.
        """
        path = Path(path)

        def numbers(key: str, name: str) -> tuple[float, ...] | None:
            value = lookup(key)
            if value is None or not value.strip():
                return None
            try:
                return tuple(float(v) for v in value.split("\\") if v.strip())
            except ValueError:
                problem = f"DICOM {name} ({key}) is not numeric: {value!r}"
                raise VolumeReadError(path, problem) from None

        def number(key: str, name: str) -> float | None:
            values = numbers(key, name)
            return values[0] if values else None

        rows, columns = number("0028|0010", "Rows"), number("0028|0011", "Columns")
        if rows is None or columns is None:
            raise VolumeReadError(path, "DICOM file without Rows/Columns: it holds no image")
        modality = (lookup("0008|0060") or "").strip().upper()
        spacing = numbers("0028|0030", "PixelSpacing")
        slope = number("0028|1053", "RescaleSlope")
        intercept = number("0028|1052", "RescaleIntercept")
        frames = number("0028|0008", "NumberOfFrames")
        return cls(
            path=path,
            modality=modality,
            units=_units(modality, lookup),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) >= 2 else None,
            slice_thickness=number("0018|0050", "SliceThickness"),
            spacing_between_slices=number("0018|0088", "SpacingBetweenSlices"),
            rows=int(rows),
            columns=int(columns),
            number_of_frames=1 if frames is None else int(frames),
            series_uid=(lookup("0020|000e") or "").strip(),
            image_position=numbers("0020|0032", "ImagePositionPatient"),
            image_orientation=numbers("0020|0037", "ImageOrientationPatient"),
        )


def _units(modality: str, lookup: TagLookup) -> str | None:
    units = (lookup("0054|1001") or "").strip()  # Units, PET Series module
    if units:
        return units
    rescale_type = (lookup("0028|1054") or "").strip()
    if rescale_type and rescale_type.upper() != "US":
        return rescale_type
    return "HU" if modality == "CT" else None


def _pydicom_lookup(ds: pydicom.Dataset) -> TagLookup:
    def get(key: str) -> str | None:
        group, element = key.split("|")
        tag = (int(group, 16), int(element, 16))
        if tag not in ds:
            return None
        value = ds[tag].value
        if value is None or isinstance(value, bytes | bytearray):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, Sequence):  # MultiValue: DICOM's backslash-separated form
            return "\\".join(str(v) for v in value)
        return str(value)

    return get


def header_from_itk(reader: sitk.ImageFileReader, path: str | Path) -> DicomHeader:
    """The :class:`DicomHeader` of a SimpleITK reader after ``ReadImageInformation``."""

    size = reader.GetSize()
    fallback = {"0028|0010": str(size[1]), "0028|0011": str(size[0])}  # Rows, Columns

    def get(key: str) -> str | None:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else fallback.get(key)

    return DicomHeader.from_tags(path, get)


def _open(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # GzipFile is a binary IO
    return open(path, "rb")


@contextmanager
def plain_dicom(path: Path) -> Iterator[Path]:
    """Yield a path GDCM can read for ``path``: a ``.dcm.gz`` is decompressed to a temp file."""
    if not path.name.lower().endswith(".dcm.gz"):
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".dcm")
    try:
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, out)
        except (OSError, EOFError) as exc:
            raise VolumeReadError(path, f"truncated or corrupt gzip stream ({exc})") from exc
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def _dcmread(path: Path, **kwargs: Any) -> pydicom.Dataset:
    """pydicom's dcmread with every failure turned into a VolumeReadError naming ``path``."""
    try:
        with _open(path) as f:
            return pydicom.dcmread(f, **kwargs)
    except FileNotFoundError:
        raise VolumeReadError(path, "no such file") from None
    except InvalidDicomError as exc:
        raise VolumeReadError(path, f"not a DICOM file ({exc})") from None
    except Exception as exc:  # truncated headers: EOFError, struct.error, ValueError, ...
        raise VolumeReadError(
            path, f"unreadable DICOM header ({type(exc).__name__}: {exc}); truncated or corrupt?"
        ) from None


def read_dicom_header(path: str | Path) -> DicomHeader:
    """Read one DICOM file's header (``.dcm``, or gzipped ``.dcm.gz``) without its pixels.

    Args:
        path: A DICOM file.

    Returns:
        The :class:`DicomHeader`.

    Raises:
        VolumeReadError: Missing, not DICOM, truncated, or holding no image; the message names
            the file.
    """
    path = Path(path)
    return DicomHeader.from_tags(path, _pydicom_lookup(_dcmread(path, stop_before_pixels=True)))


def read_dicom_slice(path: str | Path) -> tuple[np.ndarray, DicomHeader]:
    """Read a single 2D DICOM slice, rescaled to its units, for inspection.

    The pixels are decoded by SimpleITK/GDCM, as :func:`omnienc.io.read_volume` decodes volumes
    (JPEG 2000 included), and equal pydicom's ``pixel_array * RescaleSlope + RescaleIntercept``.

    Args:
        path: A DICOM file holding one frame.

    Returns:
        ``(array, header)``: ``(Rows, Columns)`` float32 in ``header.units`` (e.g. Bq/ml for PET),
        in the stored orientation (axis 0 down the rows, axis 1 along a row), and its header.

    Raises:
        VolumeReadError: Not a readable DICOM image, or a multi-frame file (a volume: read it
            with :func:`omnienc.io.read_volume`).
    """
    path = Path(path)
    header = read_dicom_header(path)
    if not header.is_single_slice:
        raise VolumeReadError(
            path,
            f"holds {header.number_of_frames} frames ({header.describe()}): a volume, not a "
            "single slice; read it with omnienc.io.read_volume",
        )
    with plain_dicom(path) as readable:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(readable))
        reader.SetOutputPixelType(sitk.sitkFloat32)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            message = " ".join(str(exc).split())[-300:]
            raise VolumeReadError(path, f"truncated or corrupt pixel data ({message})") from None
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (1, rows, cols)
    return array.reshape(header.rows, header.columns), header


def single_slice_problem(header: DicomHeader) -> str:
    """The :class:`~omnienc.errors.VolumeReadError` problem for a single 2D DICOM slice."""
    return (
        f"is a single 2D DICOM slice ({header.describe()}): not a 3D volume; omnienc reads a "
        "DICOM series from the folder holding its slices, or a multi-frame file "
        "(omnienc.io.dicom_header.read_dicom_slice reads one slice for inspection)"
    )


@dataclass(frozen=True)
class SliceSpacing:
    """Where the slices of a DICOM series lie along the slice normal.

    Attributes:
        positions: ``(N,)`` sorted slice positions along the normal, in mm.
        gaps: ``(N - 1,)`` distances between neighbouring slice centres, in mm.
    """

    positions: np.ndarray
    gaps: np.ndarray

    @property
    def mean(self) -> float:
        """The regular grid's spacing: ``(last - first) / (N - 1)``, as SimpleITK uses."""
        return float((self.positions[-1] - self.positions[0]) / (len(self.positions) - 1))

    @property
    def max_offset(self) -> float:
        """How far (mm) a slice lies from its place on the regular grid at :attr:`mean`."""
        grid = self.positions[0] + self.mean * np.arange(len(self.positions))
        return float(np.abs(self.positions - grid).max())

    @property
    def is_uniform(self) -> bool:
        """Whether every gap equals the mean within the tolerance."""
        tol = SPACING_REL_TOLERANCE * abs(self.mean) + _SPACING_ABS_TOLERANCE
        return bool(np.abs(self.gaps - self.mean).max() <= tol)


def slice_spacing(files: Sequence[str | Path]) -> SliceSpacing | None:
    """Slice positions of a series from ImagePositionPatient along the first slice's normal.

    Args:
        files: The series' files (any order).

    Returns:
        The :class:`SliceSpacing`, or ``None`` for fewer than two files, a file without
        ImagePositionPatient/ImageOrientationPatient, or a header pydicom cannot read (GDCM may
        still read it; its errors are reported when the voxels are read).
    """
    if len(files) < 2:
        return None
    tags = ["ImagePositionPatient", "ImageOrientationPatient"]
    positions = []
    normal: np.ndarray | None = None
    for name in files:
        try:
            ds = _dcmread(Path(name), stop_before_pixels=True, specific_tags=tags)
        except VolumeReadError:
            return None
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            return None
        if normal is None:
            cosines = np.asarray(iop, dtype=np.float64)
            normal = np.cross(cosines[:3], cosines[3:])
        positions.append(float(np.asarray(ipp, dtype=np.float64) @ normal))
    ordered = np.sort(np.asarray(positions))
    return SliceSpacing(positions=ordered, gaps=np.diff(ordered))


def check_slice_spacing(folder: str | Path, files: Sequence[str | Path]) -> SliceSpacing | None:
    """Warn (omnienc logger) when a series' slices are not evenly spaced.

    SimpleITK reads such a series on a regular grid at the mean gap, so each slice is placed up
    to :attr:`SliceSpacing.max_offset` from its recorded position; the warning names the folder,
    the smallest and largest gap and that offset. Missing slices show up the same way.

    Args:
        folder: The series folder, for the message.
        files: The series' files.

    Returns:
        The measured :class:`SliceSpacing` (``None`` if the positions are not recorded).
    """
    spacing = slice_spacing(files)
    if spacing is not None and not spacing.is_uniform:
        lo, hi = float(spacing.gaps.min()), float(spacing.gaps.max())
        logger.warning(
            "%s: non-uniform slice spacing: the %d slices are %.3f to %.3f mm apart (mean "
            "%.3f mm); the volume is read on a regular %.3f mm grid, so a slice may lie up to "
            "%.3f mm from its recorded position%s",
            folder,
            len(spacing.positions),
            lo,
            hi,
            spacing.mean,
            spacing.mean,
            spacing.max_offset,
            " (slices missing?)" if hi > 1.5 * max(lo, 1e-6) else "",
        )
    return spacing
