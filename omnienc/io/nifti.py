"""NIfTI (``.nii``, ``.nii.gz``), MGH/MGZ and ECAT (``.v``) volumes through nibabel."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from omnienc.errors import VolumeReadError
from omnienc.io.checks import _gzip_head_problem, _misnamed, _verify_gzip
from omnienc.io.volume import _check_size, _select_3d, file_suffix

logger = logging.getLogger("omnienc")
# A NIfTI file may hold at most this many bytes after the voxels its header declares (padding to
# a disk block); more means a damaged header (e.g. a flipped bit in a dimension). MGH/MGZ files
# carry a footer (TR, flip angle, tags) there, which is read up to _MAX_FOOTER bytes.
_MAX_TRAILING = 512
_MAX_FOOTER = 16 * 2**20


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
