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

The cases themselves are in :mod:`~omnienc.benchmarks.robustness.cases`, their generators in
:mod:`~omnienc.benchmarks.robustness.bad_files`, :mod:`~omnienc.benchmarks.robustness.bad_volumes`
and :mod:`~omnienc.benchmarks.robustness.bad_folders`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omnienc.benchmarks.robustness.bad_files import _absurd_sizes, _corrupt_files, _wrong_extensions
from omnienc.benchmarks.robustness.bad_folders import _folders, _links_and_permissions
from omnienc.benchmarks.robustness.bad_volumes import _label_maps, _shapes_and_values
from omnienc.benchmarks.robustness.cases import ENTRY_POINTS, BadInput, _Writer


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
