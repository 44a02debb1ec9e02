"""Bad folders and paths: empty or mixed folders, broken series, links, permissions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from omnienc.benchmarks.robustness.cases import (
    CT_SERIES,
    ENTRY_POINTS,
    FOUR_D,
    GOOD,
    MR,
    MR_SERIES,
    BadInput,
    Expect,
    _file_expect,
    _png_bytes,
    _Writer,
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
