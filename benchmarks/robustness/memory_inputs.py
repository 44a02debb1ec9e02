"""The large inputs of the memory benchmark, written as NIfTI from real data.

* ``128^3`` and ``256^3``: the TotalSegmentator CT resampled to that many voxels over the same
  field of view, as a higher-resolution scan of the same body would be;
* ``512x512x300``: the 512x512 DICOM CT series interpolated to 300 slices written 1 mm apart;
* ``1024^3``: a complete, valid NIfTI of 1024^3 int16 zeros (:func:`write_zeros_nifti`, a few
  MB compressed), which every command must refuse before allocating it.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from omnienc.data.root import resolve_data_root
from omnienc.io import read_volume

CT = "totalsegmentator/example_ct.nii.gz"
DICOM_CT = "totalsegmentator/example_ct_dicom"


@dataclass(frozen=True)
class MemoryInput:
    """One input volume of the benchmark.

    Attributes:
        name: ``128^3``, ``256^3``, ``512x512x300`` or ``1024^3``.
        path: The NIfTI file.
        shape: Native ``(X, Y, Z)`` voxels (as its header declares).
        spacing: Native voxel size in mm.
        refused: Whether the commands must refuse it (header over the voxel limit).
    """

    name: str
    path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    refused: bool = False

    def describe(self, target_mm: float = 2.0) -> str:
        """``SHAPE @ SPACING mm -> GRID @ 2 mm``; the grid is before the foreground crop."""
        grid = "x".join(
            str(max(1, round(n * s / target_mm)))
            for n, s in zip(self.shape, self.spacing, strict=True)
        )
        native = "x".join(str(n) for n in self.shape)
        spacing = "x".join(f"{s:.2g}" for s in self.spacing)
        if self.refused:
            return f"{native} @ {spacing} mm (over the voxel limit)"
        return f"{native} @ {spacing} mm -> {grid} @ {target_mm:g} mm"


def _write_int16(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(np.rint(array).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _resampled(
    array: np.ndarray, affine: np.ndarray, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``array`` linearly resampled to ``shape`` over the same field of view, and its affine."""
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(
        array, factors, order=1, grid_mode=True, mode="grid-constant", cval=float(array.min())
    )
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / np.asarray(factors)[None, :]
    return out, new_affine


def make_inputs(
    folder: Path,
    quick: bool = False,
    data_root: str | Path | None = None,
    only: Sequence[str] | None = None,
) -> list[MemoryInput]:
    """Write the benchmark's input volumes into ``folder`` (see the module docstring).

    Args:
        folder: Scratch folder.
        quick: Only ``128^3``, ``512x512x300`` and ``1024^3``.
        data_root: Real data root (default ``$OMNIENC_DATA`` or ``../shared/data``).
        only: Write only the inputs with these names.

    Returns:
        The inputs, smallest first.
    """
    volumes = resolve_data_root(data_root) / "volumes"
    folder.mkdir(parents=True, exist_ok=True)
    names = (
        ["128^3", "512x512x300", "1024^3"] if quick else ["128^3", "256^3", "512x512x300", "1024^3"]
    )
    if only is not None:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in only]
    inputs = []
    cubes = [int(n.split("^")[0]) for n in names if n in ("128^3", "256^3")]
    if cubes:
        ct = read_volume(volumes / CT)
        for n in cubes:
            array, affine = _resampled(ct.array, ct.affine, (n, n, n))
            path = folder / f"ct_{n}.nii.gz"
            _write_int16(path, array, affine)
            inputs.append(MemoryInput(f"{n}^3", path, (n, n, n), spacing_of(affine)))
        del ct
    if "512x512x300" in names:
        dicom = read_volume(volumes / DICOM_CT)
        shape = (dicom.shape[0], dicom.shape[1], 300)
        array = ndimage.zoom(dicom.array, (1.0, 1.0, shape[2] / dicom.shape[2]), order=1)
        affine = dicom.affine.copy()
        affine[:3, 2] = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # 1 mm between slices
        path = folder / "ct_512x512x300.nii.gz"
        _write_int16(path, array, affine)
        del array, dicom
        inputs.append(MemoryInput("512x512x300", path, shape, spacing_of(affine)))
    if "1024^3" in names:
        path = folder / "zeros_1024cubed.nii.gz"
        write_zeros_nifti(path, (1024, 1024, 1024), (0.5, 0.5, 0.5))
        inputs.append(MemoryInput("1024^3", path, (1024, 1024, 1024), (0.5, 0.5, 0.5), True))
    return inputs


def write_zeros_nifti(path: Path, shape: Sequence[int], spacing: Sequence[float]) -> Path:
    """Write a valid int16 ``.nii.gz`` of zeros without holding its voxels in memory.

    The file is a series of gzip members (which gzip readers join): the header, then one
    compressed block of zeros repeated, so writing a 2 GiB volume takes a fraction of a second.
    """
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_data_dtype(np.int16)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    header["magic"] = b"n+1"
    total = int(np.prod([int(n) for n in shape])) * 2
    block = 1 << 24
    zeros = gzip.compress(bytes(block), compresslevel=1)
    with open(path, "wb") as f:
        f.write(gzip.compress(header.binaryblock + bytes(4)))  # header + empty extension flag
        for _ in range(total // block):
            f.write(zeros)
        if total % block:
            f.write(gzip.compress(bytes(total % block), compresslevel=1))
    return path


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm of a voxel-to-world affine."""
    sx, sy, sz = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return float(sx), float(sy), float(sz)
