""":class:`Volume`, what every reader returns, and what the readers share.

Every reader returns the voxel array in canonical RAS+ axis order (the first array axis points to
the subject's Right, the second Anterior, the third Superior; nibabel's
``as_closest_canonical``), as float32, with its 4x4 voxel-to-world affine (RAS+ world, mm), the
voxel size in mm, and the modality. Here: the suffixes of each format family, the voxel limit
(:data:`DEFAULT_MAX_VOXELS`), and the reorientation, frame selection and checks every reader
applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from omnienc.errors import VolumeReadError

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz", ".v")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dcm.gz", ".dicom", ".ima")
SUPPORTED_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES

# A header may not claim more voxels than this unless the caller raises it: 2 GiB as float32,
# room for a 512x512x2048 CT; reading needs a few float32 copies of it
# (benchmarks/robustness/memory.py), so a 1024^3 header is refused before anything is allocated.
DEFAULT_MAX_VOXELS = 2**29


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
            :class:`omnienc.io.dicom_header.DicomHeader`), else ``None``.
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
