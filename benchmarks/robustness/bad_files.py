"""Bad files: corrupt or truncated bytes, absurd header sizes, wrong or missing extensions."""

from __future__ import annotations

import gzip

import numpy as np

from omnienc.benchmarks.robustness.cases import (
    _NIFTI_DATATYPE,
    _NIFTI_DIM1,
    _NIFTI_MAGIC,
    DICOM_FILE,
    ENTRY_POINTS,
    GOOD,
    MHA,
    MR,
    BadInput,
    Expect,
    _flip_bit,
    _ignored_expect,
    _nib_load,
    _png_bytes,
    _Writer,
)

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
