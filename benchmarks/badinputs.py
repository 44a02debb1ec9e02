"""Bad inputs made from the real files of the data root, for the robustness suite.

:func:`make_bad_inputs` writes every kind of broken or unusable input that a user could hand to
omnienc into a folder, each one derived from a real volume in ``<data root>/volumes`` (a real
file cut short, bit-flipped, renamed, reshaped, filled with NaN, ...), and returns one
:class:`BadInput` per case with what each public entry point must do with it
(:data:`ENTRY_POINTS`): raise the documented error naming the file and the problem
(``error``), skip the file with a warning naming it while the run goes on (``skip``), accept it
(``ok``), or nothing to test (``n/a``: a label map on the wrong grid is a valid volume on its
own; only an entry point that pairs it with an image can refuse it).

Every case lives in its own folder ``OUT/NAME/``: a bad file sits there beside a good real
volume (``anatomical.nii``), so that the folder entry points (``VolumeFolder``, ``omnienc
masks``, ``omnienc pretrain``) show that one bad file is skipped and the run goes on, while the
file entry points (``read_volume``, ``omnienc info``, ``omnienc embed``, ``omnienc segment``)
get the bad file itself. The tests (``tests/robustness/conftest.py``) and the benchmark
(``python -m omnienc.benchmarks.robustness``) use these same generators.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
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


# --------------------------------------------------------------------------------------------
# The cases


def _corrupt_files(w: _Writer) -> None:
    mr = w.real(MR).read_bytes()
    good = w.real(GOOD).read_bytes()
    w.file("zero-byte", "zero-byte", "empty.nii.gz", b"", MR, r"empty file \(0 bytes\)")
    w.file(
        "truncated",
        "truncated-nii-gz",
        "cut.nii.gz",
        mr[: len(mr) // 2],
        MR,
        "truncated or corrupt",
        "first half of the compressed file",
    )
    w.file(
        "truncated",
        "truncated-gz-header",
        "cut_header.nii.gz",
        mr[:40],
        MR,
        "truncated|unreadable header",
        "cut inside the compressed NIfTI header",
    )
    w.file(
        "truncated",
        "truncated-nii",
        "cut.nii",
        good[:-1000],
        GOOD,
        "truncated: header promises",
        "uncompressed, last 1000 bytes missing",
    )
    dcm = w.real(DICOM_FILE).read_bytes()
    w.file(
        "truncated",
        "truncated-dcm",
        "cut.dcm",
        dcm[: len(dcm) // 2],
        DICOM_FILE,
        "truncated|corrupt|unreadable",
        "DICOM file cut in half",
    )
    mha = w.real(MHA).read_bytes()
    w.file(
        "truncated",
        "truncated-mha",
        "cut.mha",
        mha[: len(mha) // 2],
        MHA,
        "truncated|corrupt|unreadable",
        "MetaImage cut in half",
    )
    # Bit flips in the compressed stream: deflate errors near the start, silent damage that only
    # the gzip CRC-32 catches in the middle, and a damaged CRC itself.
    for name, at, problem, note in (
        ("bitflip-gzip-start", 60, "corrupt|unreadable header", "one bit at byte 60 of 277 KB"),
        (
            "bitflip-gzip-middle",
            len(mr) * 3 // 10,
            "corrupt compressed data|CRC",
            "one bit at 30% of the compressed voxels",
        ),
        (
            "bitflip-gzip-late",
            len(mr) * 9 // 10,
            "corrupt compressed data|CRC",
            "one bit at 90% of the compressed voxels",
        ),
        ("bitflip-gzip-crc", len(mr) - 6, "corrupt compressed data|CRC", "one bit in the CRC-32"),
    ):
        w.file("bit-flipped", name, "flipped.nii.gz", _flip_bit(mr, at), MR, problem, note)
    raw = gzip.decompress(mr)
    for name, at, bit, problem, note in (
        (
            "bitflip-header-datatype",
            _NIFTI_DATATYPE,
            6,
            "unreadable header.*data code",
            "datatype code 4 -> 68 (unknown)",
        ),
        (
            "bitflip-header-dim",
            _NIFTI_DIM1,
            6,
            "more bytes than its header|header declares",
            "dim[1] 117 -> 53: the header declares fewer voxels than the file holds",
        ),
        (
            "bitflip-header-magic",
            _NIFTI_MAGIC + 1,
            2,
            "unreadable header",
            "NIfTI magic 'n+1' damaged",
        ),
    ):
        w.file(
            "bit-flipped",
            name,
            "flipped.nii.gz",
            gzip.compress(_flip_bit(raw, at, bit), mtime=0),
            MR,
            problem,
            note,
        )
    # Uncompressed NIfTI has no checksum: a flipped voxel bit reads as a different value.
    flipped = _flip_bit(good, len(good) - 2000, 3)
    folder = w.folder("bitflip-nii-voxel")
    path = folder / "flipped.nii"
    path.write_bytes(flipped)
    w.cases.append(
        BadInput(
            "bit-flipped",
            "bitflip-nii-voxel",
            path,
            folder,
            GOOD,
            {
                e: Expect("ok") if e in ("read_volume", "VolumeFolder") else Expect("n/a")
                for e in ENTRY_POINTS
            },
            note="undetectable: uncompressed NIfTI has no checksum (one voxel changes value)",
        )
    )


def _absurd_sizes(w: _Writer) -> None:
    header = _nib_load(w.real(GOOD)).header.copy()
    header.set_data_shape((30000, 30000, 30000))
    block = header.binaryblock + b"\0" * 4 + b"\0" * 1024
    problem = r"header declares \(30000, 30000, 30000\).*refusing to allocate"
    w.file("absurd size", "absurd-size-nii", "huge.nii", block, GOOD, problem, "30000^3 declared")
    w.file(
        "absurd size",
        "absurd-size-nii-gz",
        "huge.nii.gz",
        gzip.compress(block, mtime=0),
        GOOD,
        problem,
        "30000^3 declared, compressed",
    )
    text = w.real(MHA).read_bytes()
    head, sep, body = text.partition(b"ElementDataFile = LOCAL\n")
    if not sep:
        raise ValueError(f"{w.real(MHA)}: unexpected MetaImage header layout")
    lines = [
        b"DimSize = 100000 100000 100000" if ln.startswith(b"DimSize") else ln
        for ln in head.split(b"\n")
    ]
    w.file(
        "absurd size",
        "absurd-size-mha",
        "huge.mha",
        b"\n".join(lines) + sep + body[:4096],
        MHA,
        r"header declares \(100000, 100000, 100000\).*refusing to allocate",
        "MetaImage header DimSize 100000^3",
    )


def _wrong_extensions(w: _Writer) -> None:
    image = np.asarray(_nib_load(w.real(GOOD)).dataobj, dtype=np.float32)
    png = _png_bytes(image[:, :, image.shape[2] // 2])
    good = w.real(GOOD).read_bytes()
    w.file(
        "wrong extension",
        "png-as-nii-gz",
        "slice.nii.gz",
        png,
        GOOD,
        "not a gzip|looks like a PNG|unreadable header",
        "a PNG of a real slice named .nii.gz",
    )
    w.file(
        "wrong extension",
        "text-as-nii-gz",
        "notes.nii.gz",
        b"patient notes, not an image\n" * 20,
        GOOD,
        "not a gzip|unreadable header",
        "a text file named .nii.gz",
    )
    w.file(
        "wrong extension",
        "nifti-as-mha",
        "anatomical.mha",
        good,
        GOOD,
        "looks like a NIfTI|unreadable header",
        "a real NIfTI named .mha",
    )
    w.file(
        "wrong extension",
        "gzip-as-nii",
        "compressed.nii",
        gzip.compress(good, mtime=0),
        GOOD,
        "gzip-compressed|unreadable header",
        "a real .nii.gz named .nii",
    )
    w.file(
        "wrong extension",
        "png-as-png",
        "slice.png",
        png,
        GOOD,
        "unsupported file type '.png'",
        "a PNG: not a volume format",
        expect=_ignored_expect,
    )


def _shapes_and_values(w: _Writer) -> None:
    img = _nib_load(w.real(GOOD))
    affine = np.asarray(img.affine)
    data = np.asarray(img.dataobj, dtype=np.float32)
    w.file(
        "2D",
        "two-d",
        "slice2d.nii.gz",
        _nifti_bytes(data[:, :, data.shape[2] // 2], affine),
        GOOD,
        r"is 2D .*expects a 3D volume",
        "the middle axial slice",
    )
    w.file(
        "4D",
        "four-d",
        "functional.nii",
        w.real(FOUR_D).read_bytes(),
        FOUR_D,
        r"4D with 20 frames.*--frame",
        "real fMRI, 20 frames",
    )
    four = np.asarray(_nib_load(w.real(FOUR_D)).dataobj, dtype=np.float32)
    five = four.reshape((*four.shape[:3], 4, 5))
    w.file(
        "5D",
        "five-d",
        "functional5d.nii.gz",
        _nifti_bytes(five, np.asarray(_nib_load(w.real(FOUR_D)).affine)),
        FOUR_D,
        r"is 5D",
        "the 20 frames as 4x5",
    )
    nan = data.copy()
    nan[10:12, 10:12, 10:12] = np.nan
    w.file(
        "NaN/Inf",
        "nan-voxels",
        "nan.nii.gz",
        _nifti_bytes(nan, affine),
        GOOD,
        r"non-finite voxels \(8 NaN, 0 Inf",
        "8 NaN voxels",
    )
    inf = data.copy()
    inf[5, 5, 5], inf[6, 6, 6] = np.inf, -np.inf
    w.file(
        "NaN/Inf",
        "inf-voxels",
        "inf.nii.gz",
        _nifti_bytes(inf, affine),
        GOOD,
        r"non-finite voxels \(0 NaN, 2 Inf",
        "+Inf and -Inf voxels",
    )
    import SimpleITK as sitk

    mha = sitk.Cast(sitk.ReadImage(str(w.real(MHA))), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(mha)
    arr.flat[:: max(1, arr.size // 5)] = np.nan
    nan_mha = sitk.GetImageFromArray(arr)
    nan_mha.CopyInformation(mha)
    folder = w.folder("nan-voxels-mha")
    path = folder / "nan.mha"
    sitk.WriteImage(nan_mha, str(path))
    w.cases.append(
        BadInput(
            "NaN/Inf",
            "nan-voxels-mha",
            path,
            folder,
            MHA,
            _file_expect(path, r"non-finite voxels \(\d+ NaN"),
            note="MetaImage (SimpleITK path) with NaN voxels",
        )
    )
    for value, name in ((0.0, "constant-zero"), (100.0, "constant-100")):
        const = np.full(data.shape, value, np.float32)
        path = w.folder(name) / "constant.nii.gz"
        path.write_bytes(_nifti_bytes(const, affine))
        problem = rf"constant volume \(every voxel is {value:g}\)"
        skip = Expect("skip", ((path, problem),))
        error = Expect("error", ((path, problem),))
        w.cases.append(
            BadInput(
                "constant",
                name,
                path,
                path.parent,
                GOOD,
                {
                    "read_volume": Expect("ok"),  # a valid volume: info can describe it
                    "VolumeFolder": skip,
                    "info": Expect("ok"),
                    "masks": skip,
                    "pretrain": skip,
                    "embed": error,
                    "segment": error,
                },
                note=f"every voxel {value:g} on the real grid",
            )
        )


def _label_maps(w: _Writer) -> None:
    seg_img = _nib_load(w.real(MR_SEG))
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    affine = np.asarray(seg_img.affine)
    cases = []
    other = seg[:, :, :-2]
    cases.append(
        (
            "label grid",
            "label-other-shape",
            _nifti_bytes(other, affine),
            r"grid \(117, 91, 18\) differs from its image",
            "the real label map minus 2 slices",
        )
    )
    shifted = affine.copy()
    shifted[:3, 3] += (6.0, 0.0, 0.0)
    cases.append(
        (
            "label grid",
            "label-shifted",
            _nifti_bytes(seg, shifted),
            r"affine differs from its image",
            "same shape, origin moved 6 mm",
        )
    )
    frac = seg.astype(np.float32)
    frac[seg > 0] += 0.5
    cases.append(
        (
            "non-integer labels",
            "label-non-integer",
            _nifti_bytes(frac, affine),
            r"label map has [\d,]+ non-integer voxels",
            "every label + 0.5",
        )
    )
    neg = seg.astype(np.int16)
    neg[seg == 0] = -1
    cases.append(
        (
            "non-integer labels",
            "label-negative",
            _nifti_bytes(neg, affine),
            r"negative labels",
            "background -1",
        )
    )
    for kind, name, data, problem, note in cases:
        folder = w.folder(name, good=False)
        path = folder / "labels.nii.gz"
        path.write_bytes(data)
        cases_expect = _label_expect(path, problem)
        w.cases.append(
            BadInput(kind, name, path, folder, MR_SEG, cases_expect, role="label", note=note)
        )


def _folders(w: _Writer) -> None:
    empty = w.folder("empty-folder", good=False)
    problem = "no usable volume|no readable DICOM|holds no"
    error = Expect("error", ((empty, problem),))
    w.cases.append(
        BadInput(
            "empty folder",
            "empty-folder",
            empty,
            empty,
            "-",
            dict.fromkeys(ENTRY_POINTS, error),
            role="folder",
            note="no file at all",
        )
    )
    notes = w.folder("no-volumes", good=False)
    (notes / "README.txt").write_text("scans to come\n")
    (notes / "slice.png").write_bytes(_png_bytes(np.arange(64, dtype=np.float32).reshape(8, 8)))
    error = Expect("error", ((notes, problem),))
    w.cases.append(
        BadInput(
            "empty folder",
            "folder-without-volumes",
            notes,
            notes,
            "-",
            dict.fromkeys(ENTRY_POINTS, error),
            role="folder",
            note="a text file and a PNG only",
        )
    )

    # A folder mixing good and bad files (and a subfolder linking back to itself).
    mixed = w.folder("mixed-folder")
    shutil.copyfile(w.real(MR), mixed / Path(MR).name)
    mr = w.real(MR).read_bytes()
    bad = {
        "cut.nii.gz": (mr[: len(mr) // 3], "truncated or corrupt"),
        "empty.nii": (b"", r"empty file \(0 bytes\)"),
        "functional.nii": (w.real(FOUR_D).read_bytes(), "4D with 20 frames"),
    }
    for name, (data, _) in bad.items():
        (mixed / name).write_bytes(data)
    os.symlink("loop_b.nii.gz", mixed / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", mixed / "loop_b.nii.gz")
    os.symlink(".", mixed / "again")  # a folder loop: must neither hang nor duplicate
    (mixed / "notes.txt").write_text("not a volume\n")
    details = (
        *((mixed / n, p) for n, (_, p) in bad.items()),
        (mixed / "loop_a.nii.gz", "symbolic link loop"),
        (mixed / "loop_b.nii.gz", "symbolic link loop"),
    )
    skip = Expect("skip", details)
    not_one = Expect("error", ((mixed, "not a DICOM series|no readable DICOM"),))
    w.cases.append(
        BadInput(
            "mixed good and bad",
            "mixed-folder",
            mixed,
            mixed,
            f"{GOOD}, {MR}, {FOUR_D}",
            {
                "read_volume": not_one,
                "VolumeFolder": skip,
                "info": skip,
                "masks": skip,
                "pretrain": skip,
                "embed": skip,
                "segment": not_one,
            },
            role="folder",
            note="2 good volumes, truncated, empty, 4D, a symlink loop pair, a folder loop, text",
        )
    )

    two = w.folder("dicom-two-series", good=False)
    for rel in (CT_SERIES, MR_SERIES):
        for src in sorted(w.real(rel).iterdir()):
            shutil.copyfile(src, two / src.name)
    mixed_series = Expect("error", ((two, r"mixed DICOM series: the folder holds 2 series"),))
    ok = Expect("ok")
    w.cases.append(
        BadInput(
            "DICOM two series",
            "dicom-two-series",
            two,
            two,
            f"{CT_SERIES} + {MR_SERIES}",
            {
                "read_volume": mixed_series,
                "VolumeFolder": ok,  # a folder is scanned series by series: two volumes
                "info": ok,
                "masks": ok,
                "pretrain": ok,
                "embed": ok,
                "segment": mixed_series,
            },
            role="folder",
            note="20 CT slices + 3 MR slices in one folder",
        )
    )


def _links_and_permissions(w: _Writer) -> None:
    folder = w.folder("symlink-loop")
    path = folder / "loop.nii.gz"
    os.symlink("loop2.nii.gz", path)
    os.symlink("loop.nii.gz", folder / "loop2.nii.gz")
    expect = _file_expect(path, "symbolic link loop")
    # The folder scan meets both links of the loop; each gets its own warning.
    expect_skip = Expect("skip", ((path, "symbolic link loop"), (folder / "loop2.nii.gz", "loop")))
    for entry in ("VolumeFolder", "masks", "pretrain"):
        expect[entry] = expect_skip
    w.cases.append(
        BadInput(
            "symlink loop",
            "symlink-loop",
            path,
            folder,
            "-",
            expect,
            note="loop.nii.gz -> loop2.nii.gz -> loop.nii.gz",
        )
    )

    folder = w.folder("dangling-symlink")
    path = folder / "gone.nii.gz"
    os.symlink("deleted_scan.nii.gz", path)
    w.cases.append(
        BadInput(
            "dangling symlink",
            "dangling-symlink",
            path,
            folder,
            "-",
            _file_expect(path, "dangling symbolic link"),
            note="a link to a scan that was deleted",
        )
    )

    folder = w.folder("unreadable-file")
    path = folder / "locked.nii"
    shutil.copyfile(w.real(GOOD), path)
    path.chmod(0)
    w.cases.append(
        BadInput(
            "unreadable permissions",
            "unreadable-file",
            path,
            folder,
            GOOD,
            _file_expect(path, "permission denied"),
            unreadable=True,
            note="chmod 000",
        )
    )

    folder = w.folder("unlistable-subfolder")
    locked = folder / "locked"
    locked.mkdir()
    shutil.copyfile(w.real(GOOD), locked / "hidden.nii")
    locked.chmod(0)
    w.cases.append(
        BadInput(
            "unreadable permissions",
            "unlistable-subfolder",
            locked,
            folder,
            GOOD,
            _file_expect(locked, "permission denied"),
            role="folder",
            unreadable=True,
            note="a subfolder with mode 000 beside a good volume",
        )
    )


def make_bad_inputs(volumes: Path, out: Path, names: Sequence[str] | None = None) -> list[BadInput]:
    """Write every bad input under ``out`` and return the cases.

    Args:
        volumes: ``<data root>/volumes`` with the real files.
        out: An empty or missing folder; each case gets ``out/NAME/``.
        names: Keep only these case names (all by default).

    Returns:
        The cases, in a stable order.

    Raises:
        FileNotFoundError: A real file the cases are made from is missing.
    """
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(Path(volumes), Path(out))
    for make in (_corrupt_files, _absurd_sizes, _wrong_extensions, _shapes_and_values):
        make(w)
    _label_maps(w)
    _folders(w)
    _links_and_permissions(w)
    cases = w.cases
    if names is not None:
        unknown = set(names) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"unknown bad-input names {sorted(unknown)}")
        cases = [c for c in cases if c.name in names]
    return cases


# The kinds of bad input issue 7 lists; make_bad_inputs covers each with at least one case.
ISSUE_KINDS = (
    "zero-byte",
    "truncated",
    "bit-flipped",
    "absurd size",
    "wrong extension",
    "2D",
    "4D",
    "5D",
    "NaN/Inf",
    "constant",
    "label grid",
    "non-integer labels",
    "empty folder",
    "mixed good and bad",
    "DICOM two series",
    "unreadable permissions",
    "symlink loop",
)


def case_plan(volumes: Path) -> list[tuple[str, str, str, bool]]:
    """``(case name, entry point, expected outcome, unreadable)`` of every case, for test ids.

    Makes the cases in a temporary folder and removes it.
    """
    with tempfile.TemporaryDirectory(prefix="omnienc-badinputs-plan-") as tmp:
        try:
            cases = make_bad_inputs(volumes, Path(tmp))
        finally:
            restore_permissions(Path(tmp))
    return [(c.name, e, c.expect[e].outcome, c.unreadable) for c in cases for e in ENTRY_POINTS]


def restore_permissions(root: Path) -> None:
    """Give every file and folder below ``root`` back its owner's read/write bits (cleanup)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            mode = stat.S_IMODE(p.lstat().st_mode)
            p.chmod(mode | (0o700 if p.is_dir() else 0o600))
