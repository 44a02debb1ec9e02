"""A bad input (:class:`BadInput`) and what each entry point must do with it (:class:`Expect`).

The public entry points (:data:`ENTRY_POINTS`), the real files the cases are made from
(:data:`GOOD`, :data:`MR`, ...), the expectations shared by kinds of case, and the small writer
(:class:`_Writer`) that puts each case in its own folder beside a good real volume.
"""

from __future__ import annotations

import gzip
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

ENTRY_POINTS = ("read_volume", "VolumeFolder", "info", "masks", "pretrain", "embed", "segment")
# Entry points that take a file (the bad file itself) and those that scan a folder.
FILE_ENTRIES = ("read_volume", "info", "embed", "segment")
FOLDER_ENTRIES = ("VolumeFolder", "masks", "pretrain")
OUTCOMES = ("error", "skip", "ok", "n/a")

# Real files below <data root>/volumes the cases are made from.
GOOD = "nibabel/anatomical.nii"  # 33x41x25 MR, big-endian int16: the good volume of every folder
MR = "totalsegmentator/example_mr_sm.nii.gz"
MR_SEG = "totalsegmentator/example_seg_mr.nii.gz"  # MR's label map, same grid
FOUR_D = "nibabel/functional.nii"  # 17x21x3x20
MHA = "niivue/mha.mha"
DICOM_FILE = "pydicom/CT_small.dcm"
CT_SERIES = "totalsegmentator/example_ct_dicom"  # 20 CT slices, one series
MR_SERIES = "niivue/dicom"  # 3 MR slices, another series

# Bytes 70-71 of a NIfTI-1 header hold the datatype code, 42-43 dim[1], 344-347 the magic.
_NIFTI_DATATYPE, _NIFTI_DIM1, _NIFTI_MAGIC = 70, 42, 344


@dataclass(frozen=True)
class Expect:
    """What one entry point must do with one case.

    Attributes:
        outcome: ``error``, ``skip``, ``ok`` or ``n/a``.
        details: ``(path, regex)`` pairs: for ``error`` the message names every path and
            matches every regex; for ``skip`` each path has a warning naming it that matches its
            regex.
    """

    outcome: str
    details: tuple[tuple[Path, str], ...] = ()

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")


@dataclass(frozen=True)
class BadInput:
    """One generated bad input and what each entry point must do with it.

    Attributes:
        kind: The kind of problem, as the results table counts them (``truncated``, ...).
        name: Unique name of the case (its folder under the output root).
        path: The bad file, or the bad folder for folder cases.
        folder: The folder the folder entry points scan (the bad file beside a good volume).
        source: The real file(s) it was made from, relative to ``volumes/``.
        expect: Entry point -> :class:`Expect`.
        role: ``file`` (a volume), ``label`` (a support label map for ``segment``) or
            ``folder``.
        unreadable: The case relies on file permissions; as root (``CAP_DAC_OVERRIDE``) it only
            works in a process without that capability.
        note: Extra words for the results table.
    """

    kind: str
    name: str
    path: Path
    folder: Path
    source: str
    expect: dict[str, Expect] = field(default_factory=dict)
    role: str = "file"
    unreadable: bool = False
    note: str = ""


# --------------------------------------------------------------------------------------------
# Expectations by role


def _file_expect(path: Path, problem: str) -> dict[str, Expect]:
    """A volume file nothing can read: file entry points refuse it, folder ones skip it."""
    error = Expect("error", ((path, problem),))
    skip = Expect("skip", ((path, problem),))
    return {
        "read_volume": error,
        "VolumeFolder": skip,
        "info": error,
        "masks": skip,
        "pretrain": skip,
        "embed": error,
        "segment": error,
    }


def _ignored_expect(path: Path, problem: str) -> dict[str, Expect]:
    """A file of a format omnienc does not read: refused when given, ignored in a folder.

    A folder scan counts such files in its summary ("N other files ignored") without a warning
    each: folders of scans hold notes, PNG previews and spreadsheets.
    """
    error = Expect("error", ((path, problem),))
    out = dict.fromkeys(FILE_ENTRIES, error)
    out.update(dict.fromkeys(FOLDER_ENTRIES, Expect("ok")))
    return out


def _label_expect(path: Path, problem: str) -> dict[str, Expect]:
    """A readable volume that is a bad label map: only ``segment`` pairs it with an image."""
    out = {e: Expect("n/a") for e in ENTRY_POINTS}
    out["segment"] = Expect("error", ((path, problem),))
    return out


# --------------------------------------------------------------------------------------------
# Helpers


def _nib_load(path: Path) -> Any:
    """``nibabel.load`` typed loosely (its stubs lack the NIfTI attributes)."""
    return nib.load(path)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def _flip_bit(data: bytes, position: int, bit: int = 4) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    lo, hi = float(image.min()), float(image.max())
    scaled = ((image - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(scaled).save(buf, format="PNG")
    return buf.getvalue()


class _Writer:
    """Writes the cases under ``out``, each in its own folder with the good volume beside it."""

    def __init__(self, volumes: Path, out: Path) -> None:
        self.volumes = volumes
        self.out = out
        self.cases: list[BadInput] = []

    def real(self, rel: str) -> Path:
        path = self.volumes / rel
        if not path.exists():
            raise FileNotFoundError(f"{path}: real file needed to make the bad inputs is missing")
        return path

    def folder(self, name: str, good: bool = True) -> Path:
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=False)
        if good:
            shutil.copyfile(self.real(GOOD), folder / Path(GOOD).name)
        return folder

    def file(
        self,
        kind: str,
        name: str,
        filename: str,
        data: bytes,
        source: str,
        problem: str,
        note: str = "",
        expect: Callable[[Path, str], dict[str, Expect]] | None = None,
    ) -> Path:
        folder = self.folder(name)
        path = folder / filename
        path.write_bytes(data)
        make_expect = expect or _file_expect
        self.cases.append(
            BadInput(kind, name, path, folder, source, make_expect(path, problem), note=note)
        )
        return path
