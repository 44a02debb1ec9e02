"""Peak memory of ``omnienc embed`` and ``omnienc segment`` on large volumes.

Each case runs the command in a fresh process and reads that process's peak resident set size
(``ru_maxrss`` from ``os.wait4``, started from a small launcher so that the pages of the process
that starts it do not count; see :func:`peak_rss`), so imports, reading, preprocessing, the
encoder and writing the output all count. Inputs, written as NIfTI into a scratch folder from
real data:

* ``128^3`` and ``256^3``: the TotalSegmentator CT (``example_ct.nii.gz``, 122x101x112 at 3 mm)
  resampled to that many voxels over the same field of view (2.9/1.4 mm voxels), as a
  higher-resolution scan of the same body would be;
* ``512x512x300``: the 512x512 DICOM CT series (20 slices of 2 mm), interpolated to 300 slices
  written 1 mm apart (a 500x500x300 mm chest-abdomen CT);
* ``1024^3``: a complete, valid NIfTI of 1024^3 int16 zeros (2 GiB of voxels, 4 GiB as float32;
  a few MB compressed). Its header is over :data:`omnienc.io.DEFAULT_MAX_VOXELS`, so both commands
  must refuse it, naming the file, before anything of its size is allocated.

The shipped checkpoint resamples to 2 mm, so the encoder sees grids of at most about 183x152x168
(the CT at any resolution) and 250x250x150 (the 512x512x300 CT) before the foreground crop;
``omnienc embed`` encodes grids larger than 128 voxels along an axis by 128^3 sliding windows
(:func:`omnienc.embed.pooled_features`), and ``omnienc segment`` sweeps 96^3 windows (192 mm,
:func:`omnienc.pretext.segment.default_window`; 32^3 before 2026-12-07), four per encoder call.

The stated bound (:func:`bound_mb`)::

    peak RSS <= base + 5 x (float32 MB of the larger of the native and the 2 mm grid) + 400 MB
    peak RSS <= base + 150 MB                                  (an input refused at once)

``base`` is measured on the machine that runs the benchmark (:func:`base_rss_mb`): the peak of
a fresh process that imports the command line, the two measured entry points' modules
(``omnienc.embed``, ``omnienc.pretext.segment``), torch and MONAI and loads the checkpoint,
then exits. It is what both commands pay before they read a voxel, and it moves with the installed
packages, not with omnienc: MONAI imports transformers, matplotlib, pandas, scikit-learn and
scikit-image when they are installed, and the CUDA build of torch maps several hundred MB of
libraries (1150 MB on 2026-11-22, 1341 MB on 2026-12-01 and 1452 MB on a CI machine the same
day, with no change in what omnienc allocates: a constant base failed CI by 2 MB).
``NATIVE_COPIES`` = 5 covers the copies of the
volume alive at once while it is read (int16 and float32) and resampled (MONAI's ``Spacingd``
computes in float64: 2 float32-sizes), and for ``segment`` the probability map and mask written
back on the native grid; ``WINDOW_MB`` = 400 covers the encoder on one 128^3 window (about
110 MB for ``resconv_small``) and the preprocessed grid. ``REFUSED_MB`` = 150 is the most a
refused input may add to the base: a 1024^3 volume is 2048 MB as int16, so anything of its
size allocated fails the bound. Encoded in one piece, activations would
grow with the preprocessed grid instead (about 32 bytes per voxel: 0.5 GB at 256^3). With the
shipped 2 mm checkpoint the peak on these inputs is set by reading and resampling, not by the
encoder. Run::

    python -m omnienc.benchmarks.robustness.memory [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from omnienc.benchmarks.robustness.interrupts import omnienc_command
from omnienc.benchmarks.robustness.memory_inputs import MemoryInput, make_inputs
from omnienc.data.root import resolve_data_root

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "omnienc-cpu30min"
SUPPORT = ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz")
SUPPORT_LABEL = 5  # liver
ENTRY_POINTS = ("embed", "segment")

# The bound: see the module docstring.
NATIVE_COPIES = 5.0
WINDOW_MB = 400.0
REFUSED_MB = 150.0
TIMEOUT_S = 600


def bound_mb(item: MemoryInput, base_mb: float, spacing: float = 2.0) -> float:
    """The stated peak-RSS bound for one input (the same for both entry points).

    ``base_mb + NATIVE_COPIES * grid_MB + WINDOW_MB``, ``grid_MB`` being the float32 size of
    the larger of the native grid and the grid at ``spacing`` mm (the checkpoint's); a refused
    input gets ``base_mb + REFUSED_MB``: nothing of its size may be allocated.

    Args:
        item: The input.
        base_mb: The measured peak of a process that only imports and loads the checkpoint
            (:func:`base_rss_mb`).
        spacing: The checkpoint's voxel size in mm.
    """
    if item.refused:
        return base_mb + REFUSED_MB
    resampled = np.prod(
        [max(1, round(n * s / spacing)) for n, s in zip(item.shape, item.spacing, strict=True)]
    )
    grid_mb = float(max(np.prod(item.shape), resampled)) * 4 / 2**20
    return base_mb + NATIVE_COPIES * grid_mb + WINDOW_MB


def base_rss_mb(checkpoint: Path = CHECKPOINT) -> float:
    """Peak RSS in MB of a fresh process that pays what every command pays before any input.

    It imports ``omnienc.cli``, ``omnienc.embed``, ``omnienc.pretext.segment``, torch and
    MONAI, loads ``checkpoint`` and exits; measured the same way as the commands
    (:func:`peak_rss`). (``omnienc.embed`` alone adds about 90 MB to the command line's imports.)

    Raises:
        RuntimeError: The process failed.
    """
    code = (
        "import sys, monai, torch, omnienc.cli, omnienc.embed, omnienc.pretext.segment\n"
        "from omnienc.checkpoint import load_encoder\n"
        "load_encoder(sys.argv[1])\n"
    )
    peak, _, returncode, stderr = peak_rss([sys.executable, "-c", code, str(checkpoint)])
    if returncode != 0:
        raise RuntimeError(f"the base-memory process failed ({returncode}): {stderr[-500:]}")
    return peak


# Runs argv[2:] as its child and writes the child's exit status and ru_maxrss (KiB) to argv[1].
# Linux counts the pages a process held before exec() in its ru_maxrss, so a command forked
# straight from a large process (a test runner, this benchmark after writing its inputs) would
# report at least that process's size; forked from this small launcher it reports its own peak.
_LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        sys.stderr.write(f"cannot run {sys.argv[2]}: {exc}\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def peak_rss(command: Sequence[str], timeout: float = TIMEOUT_S) -> tuple[float, float, int, str]:
    """Run ``command`` in a fresh process and measure its peak resident set size.

    The command runs as the child of a small launcher interpreter (see ``_LAUNCHER``), which
    reports the command's ``ru_maxrss`` from ``os.wait4``: its own peak (and that of any
    children it waited for), not that of the process that started it.

    Returns:
        ``(peak_rss_mb, seconds, returncode, stderr_tail)``; a command still running after
        ``timeout`` seconds is killed (return code ``-9``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        report, err_path = Path(tmp) / "report", Path(tmp) / "stderr"
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *command]
        start = time.perf_counter()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                launcher, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command
                proc.wait()
        seconds = time.perf_counter() - start
        tail = err_path.read_bytes().decode(errors="replace")[-2000:]
        if not report.is_file():
            return float("nan"), seconds, -signal.SIGKILL, tail
        code, maxrss_kib = (int(v) for v in report.read_text().split())
    return maxrss_kib / 1024, seconds, code, tail


def _command(
    entry_point: str, item: MemoryInput, checkpoint: Path, out: Path, volumes: Path
) -> list[str]:
    if entry_point == "embed":
        return [*omnienc_command(), "embed", str(checkpoint), str(item.path), "-o", str(out), "-q"]
    support, mask = (str(volumes / rel) for rel in SUPPORT)
    return [
        *omnienc_command(),
        "segment",
        str(checkpoint),
        "--support",
        support,
        mask,
        "--label",
        str(SUPPORT_LABEL),
        "--query",
        str(item.path),
        "-o",
        str(out),
    ]


def _output_ok(entry_point: str, item: MemoryInput, out: Path, returncode: int, stderr: str) -> str:
    """``""`` when the command did what it must, else what went wrong."""
    if item.refused:
        if returncode == 0:
            return "not refused"
        if "refusing to allocate" not in stderr or item.path.name not in stderr:
            return f"refused without the expected message: {stderr.strip()[-300:]}"
        if "Traceback" in stderr:
            return "a traceback reached the user"
        return ""
    if returncode != 0:
        return f"exit {returncode}: {stderr.strip()[-300:]}"
    if entry_point == "embed":
        with np.load(out, allow_pickle=False) as z:
            feats = z["features"]
        if feats.shape[0] != 1 or not np.all(np.isfinite(feats)):
            return f"bad features {feats.shape}"
    else:
        shape = tuple(nib.load(out).shape)  # type: ignore[attr-defined]
        if shape != item.shape:
            return f"mask shape {shape} differs from the query {item.shape}"
    return ""


def measure_case(
    entry_point: str,
    item: MemoryInput,
    scratch: Path,
    base_mb: float,
    checkpoint: Path = CHECKPOINT,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Run one entry point on one input in a fresh process; one result row.

    ``base_mb`` is :func:`base_rss_mb` of this machine, measured once by the caller.
    """
    if entry_point not in ENTRY_POINTS:
        raise ValueError(f"entry_point must be one of {ENTRY_POINTS}, got {entry_point!r}")
    volumes = resolve_data_root(data_root) / "volumes"
    suffix = ".npz" if entry_point == "embed" else ".nii.gz"
    out = scratch / f"out-{entry_point}-{item.path.name.split('.')[0]}{suffix}"
    peak, seconds, code, stderr = peak_rss(_command(entry_point, item, checkpoint, out, volumes))
    problem = _output_ok(entry_point, item, out, code, stderr)
    bound = bound_mb(item, base_mb)
    return {
        "input": item.name,
        "shape": item.describe(),
        "entry_point": f"omnienc {entry_point}",
        "peak_rss_mb": round(peak, 1),
        "base_mb": round(base_mb, 1),
        "bound_mb": round(bound, 1),
        "ok": not problem and peak <= bound,
        "seconds": round(seconds, 1),
        "outcome": "refused before allocating" if item.refused and not problem else problem or "ok",
    }


def measure_peaks(quick: bool = False) -> list[dict[str, Any]]:
    """Peak RSS of ``omnienc embed`` and ``omnienc segment`` on every input.

    Args:
        quick: Leave out ``256^3`` and run ``segment`` on ``128^3`` and the refused header only.

    Returns:
        One row per (input, entry point): ``input``, ``shape`` (native, and the 2 mm grid the
        encoder sees before the foreground crop), ``entry_point``, ``peak_rss_mb``, ``base_mb``
        (:func:`base_rss_mb`), ``bound_mb`` (:func:`bound_mb`), ``ok`` (the command did what it
        must and stayed under the bound),
        ``seconds``, ``outcome``.
    """
    scratch = Path(tempfile.mkdtemp(prefix="omnienc-memory-"))
    try:
        rows = []
        base = base_rss_mb()
        for item in make_inputs(scratch / "inputs", quick=quick):
            for entry_point in ENTRY_POINTS:
                if quick and entry_point == "segment" and item.name == "512x512x300":
                    continue
                rows.append(measure_case(entry_point, item, scratch, base))
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Print the rows of :func:`measure_peaks`; exit 1 if any is not ok."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = parser.parse_args(argv)
    rows = measure_peaks(quick=args.quick)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
