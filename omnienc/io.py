"""Read and write 3D medical volumes: ``read_volume(path) -> Volume``.

Every reader returns the voxel array in canonical RAS+ axis order (the first array axis points to
the subject's Right, the second Anterior, the third Superior; nibabel's
``as_closest_canonical``), as float32, with its 4x4 voxel-to-world affine (RAS+ world, mm), the
voxel size in mm, and the modality.

Formats:
    NIfTI (``.nii``, ``.nii.gz``), MGH/MGZ and ECAT (``.v``) through nibabel; MetaImage
    (``.mha``/``.mhd``), NRRD (``.nrrd``/``.nhdr``) through SimpleITK; a DICOM series folder, a
    multi-frame DICOM file (``.dcm``, also gzipped ``.dcm.gz``) through SimpleITK/GDCM, which
    also decodes JPEG 2000 pixel data and applies every file's RescaleSlope/RescaleIntercept (a
    series is read as float32, so that slices with fractional slopes are not truncated). A single
    2D DICOM slice is not a volume: it is refused (:func:`omnienc.io_dicom.read_dicom_slice` reads
    one). DICOM headers, units and slice geometry are in :mod:`omnienc.io_dicom`.

Every problem raises :class:`~omnienc.errors.VolumeReadError`, whose message names the file and
what is wrong with it.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel import orientations

from omnienc.atomic import atomic_target
from omnienc.errors import PathError, VolumeReadError
from omnienc.io_dicom import (
    DicomHeader,
    check_slice_spacing,
    header_from_itk,
    plain_dicom,
    single_slice_problem,
)
from omnienc.preprocessing import MODALITIES

logger = logging.getLogger("omnienc")

# SimpleITK prints ITK warnings (e.g. "No Series were found") straight to stderr; we raise instead.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz", ".v")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dcm.gz", ".dicom", ".ima")
SUPPORTED_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES

# A header may not claim more voxels than this unless the caller raises it: 2 GiB as float32,
# room for a 512x512x2048 CT; reading needs a few float32 copies of it (benchmarks/memory.py),
# so a 1024^3 header is refused before anything is allocated.
DEFAULT_MAX_VOXELS = 2**29
# A NIfTI file may hold at most this many bytes after the voxels its header declares (padding to
# a disk block); more means a damaged header (e.g. a flipped bit in a dimension). MGH/MGZ files
# carry a footer (TR, flip angle, tags) there, which is read up to _MAX_FOOTER bytes.
_MAX_TRAILING = 512
_MAX_FOOTER = 16 * 2**20
# Leading bytes of formats a misnamed file may really be in, for pointed error messages.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive (e.g. .npz)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)

# (1, 1, 1) -> identity: flips LPS (ITK's world) to RAS (nibabel's world).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

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


@dataclass
class Volume:
    """A 3D image in canonical RAS+ axis order.

    Attributes:
        array: ``(X, Y, Z)`` float32 voxels; axis 0 points Right, 1 Anterior, 2 Superior.
        affine: ``(4, 4)`` float64 voxel-to-world (RAS+, mm) matrix of ``array``.
        spacing: Voxel size in mm along the three array axes.
        modality: ``"CT"``, ``"MR"``, ``"PET"``, ``"SPECT"`` or ``"unknown"``.
        modality_source: How the modality was found: ``given``, ``dicom``, ``format``,
            ``intensity``, ``filename`` or ``none``.
        source: The file or DICOM folder it was read from.
        units: Units of the voxel values where the file states them (DICOM: the PET Units tag
            such as ``BQML``, a Rescale Type, or ``HU`` for CT; see
            :class:`omnienc.io_dicom.DicomHeader`), else ``None``.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    modality_source: str
    source: Path
    units: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` voxel counts."""
        x, y, z = self.array.shape
        return int(x), int(y), int(z)

    @property
    def orientation(self) -> str:
        """Axis codes of the array, ``"RAS"`` for everything :func:`read_volume` returns."""
        return "".join(nib.aff2axcodes(self.affine))


def file_suffix(path: Path) -> str:
    """Lower-case suffix, with ``.nii.gz`` and ``.dcm.gz`` kept whole."""
    name = path.name.lower()
    for s in (".nii.gz", ".dcm.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_volume_path(path: Path) -> bool:
    """Whether ``path`` is a file with a suffix :func:`read_volume` knows."""
    return path.is_file() and file_suffix(path) in SUPPORTED_SUFFIXES


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: the column norms of the affine's 3x3 part."""
    sx, sy, sz = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return float(sx), float(sy), float(sz)


def check_readable(path: str | Path, error: type[PathError] = VolumeReadError) -> None:
    """Raise ``error`` naming ``path`` if it cannot be opened, and saying why.

    Tells apart a missing path, a dangling symbolic link, a symbolic link loop, a file that cannot
    be read and a folder that cannot be listed (file modes are checked by opening, not with
    ``os.access``, so that the answer is also right for root and for ACLs).

    Args:
        path: A file or folder.
        error: The :class:`~omnienc.errors.PathError` subclass to raise.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(
                path, f"dangling symbolic link to {os.readlink(path)} (the target does not exist)"
            ) from None
        raise error(path, "no such file or folder") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(path, "symbolic link loop (the link leads back to itself)") from None
        if exc.errno == errno.EACCES:
            raise error(path, "permission denied: a folder on its path cannot be entered") from None
        raise error(path, f"cannot be opened ({exc.strerror})") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            os.scandir(path).close()
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        what = "the folder cannot be listed" if stat.S_ISDIR(st.st_mode) else "cannot read the file"
        raise error(path, f"permission denied: {what} (check its mode and owner)") from None
    except OSError as exc:
        raise error(path, f"cannot be opened ({exc.strerror})") from None


def _sniff(path: Path) -> str | None:
    """What the first bytes of ``path`` say it is, when that is a format people misname."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    # DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI-1 image"
    if head.startswith(b"ObjectType") or b"ElementDataFile" in head:
        return "a MetaImage (.mha) header"
    if head.startswith(b"NRRD"):
        return "an NRRD image"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file"
    return None


def _misnamed(path: Path) -> str:
    """`` (its content looks like X, not SUFFIX)`` when the content contradicts the suffix."""
    what = _sniff(path)
    suffix = file_suffix(path)
    expected = {
        ".nii": ("a NIfTI-1 image",),
        ".nii.gz": ("gzip-compressed",),
        ".mgz": ("gzip-compressed",),
        ".dcm.gz": ("gzip-compressed",),
        ".dcm": ("a DICOM file",),
        ".mha": ("a MetaImage (.mha) header",),
        ".mhd": ("a MetaImage (.mha) header",),
        ".nrrd": ("an NRRD image",),
        ".nhdr": ("an NRRD image",),
    }.get(suffix, ())
    if what is None or what in expected:
        return ""
    return f"; its content looks like {what}, not a {suffix} file: is it misnamed?"


def _verify_gzip(path: Path, needed: int, trailing: int) -> int:
    """Decompress ``path`` once in blocks: the gzip CRC-32 and length checks find flipped bits.

    nibabel stops reading at the last voxel, before the checksum, so a bit flipped inside the
    compressed voxels would go unnoticed; this pass reads to the end of the stream.

    Args:
        path: A gzip-compressed file.
        needed: Bytes the header says the uncompressed file holds at least.
        trailing: Bytes allowed after those (at most); more is an error.

    Returns:
        The uncompressed size.

    Raises:
        VolumeReadError: Corrupt or truncated compressed data, fewer bytes than ``needed``, or
            more than ``needed + trailing``.
    """
    size = 0
    limit = needed + trailing
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 22):
                size += len(block)
                if size > limit:
                    break
    except EOFError as exc:
        raise VolumeReadError(
            path,
            f"truncated or corrupt compressed data: the gzip stream ends early ({exc}); was the "
            "file cut short?",
        ) from None
    except gzip.BadGzipFile as exc:
        raise VolumeReadError(
            path,
            f"truncated or corrupt compressed data ({exc}): the file is damaged "
            "(a flipped bit or a bad copy)",
        ) from None
    except (zlib.error, OSError) as exc:
        raise VolumeReadError(
            path, f"truncated or corrupt compressed data ({type(exc).__name__}: {exc})"
        ) from None
    if size < needed:
        raise VolumeReadError(
            path,
            f"truncated: header promises {needed:,} bytes (header + voxels), the compressed "
            f"file holds {size:,}",
        )
    if size > limit:
        raise VolumeReadError(
            path,
            f"holds more bytes after its voxels than its header declares ({needed:,} bytes of "
            "header + voxels): the header's dimensions or data type are damaged",
        )
    return size


def _gzip_head_problem(path: Path) -> str | None:
    """Why the start of a gzip file cannot be decompressed, or ``None`` if it can."""
    if _sniff(path) != "gzip-compressed":
        return None
    try:
        with gzip.open(path, "rb") as f:
            f.read(4096)
    except EOFError:
        return "truncated: the compressed file ends inside the image header (file cut short?)"
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        return f"truncated or corrupt compressed data in the image header ({exc})"
    return None


@contextmanager
def _nibabel_reports(path: Path) -> Iterator[list[str]]:
    """Collect what nibabel logs while reading a header (it prints fixes without a file name)."""
    nib_logger = logging.getLogger("nibabel.global")
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    saved = nib_logger.handlers[:], nib_logger.propagate
    nib_logger.handlers, nib_logger.propagate = [_Collect()], False
    try:
        yield messages
    finally:
        nib_logger.handlers, nib_logger.propagate = saved


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the first three axes to the closest canonical RAS+ orientation.

    Args:
        array: ``(X, Y, Z, ...)`` voxels indexed as ``affine`` describes.
        affine: ``(4, 4)`` voxel-to-RAS-world matrix.

    Returns:
        The reoriented array and its affine (the same reorientation nibabel's
        ``as_closest_canonical`` applies).
    """
    ornt = orientations.io_orientation(affine)
    target = orientations.axcodes2ornt(("R", "A", "S"))
    transform = orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, target):
        return array, affine
    out = orientations.apply_orientation(array, transform)
    new_affine = affine @ orientations.inv_ornt_aff(transform, array.shape[:3])
    return out, new_affine


def _select_3d(array: np.ndarray, path: Path, frame: int | None) -> np.ndarray:
    """Reduce an N-d array to 3D: drop trailing singleton axes, pick ``frame`` from a 4D one."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3:
        raise VolumeReadError(
            path, f"is {array.ndim}D (shape {array.shape}); omnienc expects a 3D volume"
        )
    if array.ndim == 3:
        if frame not in (None, 0):
            raise VolumeReadError(path, f"is 3D (shape {array.shape}); frame={frame} is invalid")
        return array
    if array.ndim > 4:
        raise VolumeReadError(
            path, f"is {array.ndim}D (shape {array.shape}); omnienc expects a 3D volume"
        )
    n = array.shape[3]
    if frame is None:
        raise VolumeReadError(
            path,
            f"is 4D with {n} frames (shape {array.shape}); pass frame=0..{n - 1} to choose one "
            "(--frame on the command line; omnienc never picks a frame silently)",
        )
    if not 0 <= frame < n:
        raise VolumeReadError(path, f"frame={frame} is out of range: the file has {n} frames")
    return np.asarray(array[..., frame])


def _check_size(shape: tuple[int, ...], path: Path, max_voxels: int) -> None:
    if any(int(s) < 0 for s in shape):
        raise VolumeReadError(path, f"header declares a negative size {tuple(shape)}")
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > max_voxels:
        raise VolumeReadError(
            path,
            f"header declares {tuple(int(s) for s in shape)} = {n:,} voxels, more than the "
            f"limit of {max_voxels:,} (pass max_voxels= to raise it); refusing to allocate",
        )


def _check_finite(array: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(bad.sum()) - n_nan
        raise VolumeReadError(
            path, f"contains non-finite voxels ({n_nan:,} NaN, {n_inf:,} Inf of {array.size:,})"
        )


def _read_nibabel(path: Path, frame: int | None, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    suffix = file_suffix(path)
    try:
        with _nibabel_reports(path) as reports:
            img: Any = nib.ecat.load(path) if suffix == ".v" else nib.load(path)
    except Exception as exc:
        damage = _gzip_head_problem(path) if suffix in (".nii.gz", ".mgz") else None
        if damage is not None:
            raise VolumeReadError(path, damage) from exc
        raise VolumeReadError(
            path, f"unreadable header ({type(exc).__name__}: {exc}){_misnamed(path)}"
        ) from exc
    for message in dict.fromkeys(reports):
        logger.warning("%s: nibabel repaired the header on reading: %s", path, message)
    shape = tuple(int(s) for s in img.shape)
    _check_size(shape, path, max_voxels)
    if suffix in (".nii", ".mgh", ".nii.gz", ".mgz"):
        # The file must hold every voxel the header promises, and (NIfTI) nothing much more.
        expected = int(np.prod(shape)) * img.get_data_dtype().itemsize
        offset = int(getattr(img.dataobj, "offset", 0))
        trailing = _MAX_TRAILING if suffix in (".nii", ".nii.gz") else _MAX_FOOTER
        if suffix in (".nii.gz", ".mgz"):
            _verify_gzip(path, offset + expected, trailing)
        else:
            actual = path.stat().st_size
            if actual < offset + expected:
                raise VolumeReadError(
                    path,
                    f"truncated: header promises {expected:,} bytes of voxels after offset "
                    f"{offset}, the file has {actual - offset:,}{_misnamed(path)}",
                )
            if actual > offset + expected + trailing:
                raise VolumeReadError(
                    path,
                    f"holds {actual - offset - expected:,} more bytes after its voxels than its "
                    f"header declares (shape {shape}, {img.get_data_dtype()}): the header's "
                    "dimensions or data type are damaged",
                )
    try:
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise VolumeReadError(
            path, f"truncated or corrupt voxel data ({type(exc).__name__}: {exc})"
        ) from exc
    array = _select_3d(array, path, frame)
    return array, np.asarray(img.affine, dtype=np.float64)


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
    (:func:`omnienc.io_dicom.check_slice_spacing`).
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
