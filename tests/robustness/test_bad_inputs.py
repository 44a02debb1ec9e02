"""Every kind of bad input x every public entry point: a clear error, or a skip with a warning.

The matrix: each case of :func:`omnienc.benchmarks.robustness.badinputs.make_bad_inputs` (zero-byte,
truncated, bit-flipped, oversized, misnamed, 2D/4D/5D, NaN/Inf, constant, bad label maps, empty
and mixed folders, two DICOM series, unreadable files and folders, symbolic link loops) goes to
``read_volume``, ``VolumeFolder``, ``omnienc info``, ``omnienc masks``, ``omnienc embed``,
``omnienc segment`` and (slow) ``omnienc pretrain``. An ``error`` must be the documented omnienc
error naming the file and the problem (on the command line: one ``omnienc: error:`` line, exit
status 1, no traceback); a ``skip`` must name the file and the problem in a warning while the
run goes on (:func:`omnienc.benchmarks.robustness.harness.judge`).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from omnienc.benchmarks.robustness.badinputs import (
    ISSUE_KINDS,
    case_plan,
    make_bad_inputs,
    restore_permissions,
)
from omnienc.benchmarks.robustness.cases import ENTRY_POINTS, MR, BadInput
from omnienc.benchmarks.robustness.observation import RunContext, judge, observe
from omnienc.benchmarks.robustness.privileges import (
    dac_override_active,
    observe_without_dac_override,
)
from omnienc.data.root import resolve_data_root
from omnienc.errors import VolumeReadError
from omnienc.io import read_volume

OMNIENC = str(Path(sys.executable).with_name("omnienc"))
AS_ROOT = dac_override_active()
ROOT_REASON = (
    "running as root: chmod 000 does not block reads here, so this check runs in a child "
    "process without CAP_DAC_OVERRIDE (test_unreadable_inputs_without_dac_override, slow)"
)


def _plan() -> list[tuple[str, str, str, bool]]:
    try:
        return case_plan(resolve_data_root() / "volumes")
    except Exception as exc:  # no data: one failing test says so instead of a collection error
        return [(f"PLAN-FAILED: {exc}", "read_volume", "error", False)]


PLAN = [p for p in _plan() if p[2] != "n/a"]


def _params(pretrain: bool) -> list[Any]:
    return [
        pytest.param(name, entry, id=f"{name}-{entry}")
        for name, entry, _, _ in PLAN
        if (entry == "pretrain") == pretrain
    ]


def _check(case: BadInput, entry: str, ctx: RunContext) -> None:
    if case.unreadable and AS_ROOT:
        if entry != "read_volume":
            pytest.skip(ROOT_REASON)
        (obs,) = observe_without_dac_override([(case, entry)], ctx)
        if obs.outcome == "untestable":
            pytest.skip(obs.message)
    else:
        obs = observe(case, entry, ctx)
    verdict = judge(case, entry, obs)
    assert verdict.passed, verdict.reason


@pytest.mark.parametrize(("name", "entry"), _params(pretrain=False))
def test_bad_input_at_entry_point(
    name: str, entry: str, bad_inputs: dict[str, BadInput], run_context: RunContext
):
    assert name in bad_inputs, name
    _check(bad_inputs[name], entry, run_context)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "entry"), _params(pretrain=True))
def test_bad_input_in_pretraining_data(
    name: str, entry: str, bad_inputs: dict[str, BadInput], run_context: RunContext
):
    _check(bad_inputs[name], entry, run_context)


@pytest.mark.slow
def test_unreadable_inputs_without_dac_override(
    bad_inputs: dict[str, BadInput], run_context: RunContext
):
    """As root, every entry point on mode-000 files and folders, in a child that obeys modes."""
    if not AS_ROOT:
        pytest.skip("not root: the matrix already ran these cases in process")
    jobs = [
        (c, e)
        for c in bad_inputs.values()
        if c.unreadable
        for e in ENTRY_POINTS
        if c.expect[e].outcome != "n/a"
    ]
    assert len(jobs) >= 12
    observations = observe_without_dac_override(jobs, run_context)
    if observations[0].outcome == "untestable":
        pytest.skip(observations[0].message)
    failures = [
        v.reason
        for v in (judge(c, e, o) for (c, e), o in zip(jobs, observations, strict=True))
        if not v.passed
    ]
    assert not failures, failures


def test_every_kind_the_issue_lists_is_covered(bad_inputs: dict[str, BadInput]):
    kinds = {c.kind for c in bad_inputs.values()}
    assert set(ISSUE_KINDS) <= kinds, set(ISSUE_KINDS) - kinds
    assert "dangling symlink" in kinds
    for case in bad_inputs.values():
        assert set(case.expect) == set(ENTRY_POINTS), case.name
        assert case.path.exists() or case.path.is_symlink(), case.path


def test_plan_matches_the_generated_cases(bad_inputs: dict[str, BadInput]):
    planned = {(n, e, o) for n, e, o, _ in PLAN}
    made = {
        (c.name, e, c.expect[e].outcome)
        for c in bad_inputs.values()
        for e in ENTRY_POINTS
        if c.expect[e].outcome != "n/a"
    }
    assert planned == made


def test_bit_flip_that_nibabel_reads_silently_is_caught(bad_inputs: dict[str, BadInput], volumes):
    """nibabel stops before the gzip CRC: the damaged voxels load; read_volume checks the CRC."""
    case = bad_inputs["bitflip-gzip-middle"]
    damaged = np.asarray(nib.load(case.path).dataobj)
    original = np.asarray(nib.load(volumes / MR).dataobj)
    assert damaged.shape == original.shape
    assert not np.array_equal(damaged, original)  # silent damage without the CRC check
    with pytest.raises(VolumeReadError, match=r"CRC|corrupt compressed data") as info:
        read_volume(case.path)
    assert str(case.path) in str(info.value)


def test_header_declaring_fewer_voxels_than_the_file_holds(bad_inputs: dict[str, BadInput]):
    case = bad_inputs["bitflip-header-dim"]
    assert nib.load(case.path).shape[0] == 53  # nibabel would serve a 53-wide volume
    with pytest.raises(VolumeReadError, match="more bytes after its voxels") as info:
        read_volume(case.path)
    assert str(case.path) in str(info.value)


def test_repaired_header_warns_naming_the_file(
    tmp_path: Path, volumes: Path, caplog: pytest.LogCaptureFixture
):
    """nibabel fixes some header fields while printing an anonymous line; omnienc names the file."""
    raw = bytearray(gzip.decompress((volumes / MR).read_bytes()))
    raw[0] ^= 0x40  # sizeof_hdr 348 -> 284: nibabel resets it and reads the volume
    path = tmp_path / "fixed.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    caplog.set_level("WARNING", logger="omnienc")
    vol = read_volume(path)
    assert vol.shape == (117, 91, 20)
    messages = [r.getMessage() for r in caplog.records if r.name == "omnienc"]
    assert any(str(path) in m and "sizeof_hdr" in m for m in messages), messages


@pytest.mark.parametrize("name", ["truncated-mha", "bitflip-header-datatype", "truncated-dcm"])
def test_no_stray_library_output(name: str, bad_inputs: dict[str, BadInput]):
    """ITK and nibabel print to the terminal by themselves; a refused file prints nothing else."""
    code = (
        "import sys\nfrom omnienc.io import read_volume\n"
        "from omnienc.errors import VolumeReadError\n"
        "try:\n    read_volume(sys.argv[1])\nexcept VolumeReadError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bad_inputs[name].path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert str(bad_inputs[name].path) in out.stdout
    assert out.stderr == ""


@pytest.mark.slow
def test_console_script_info_on_every_bad_file(bad_inputs: dict[str, BadInput]):
    """The real ``omnienc`` process: one table row per bad file, exit 1, no traceback."""
    files = [
        c
        for c in bad_inputs.values()
        if c.role == "file" and c.expect["info"].outcome == "error" and not c.unreadable
    ]
    out = subprocess.run(
        [OMNIENC, "info", *(str(c.path) for c in files)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    rows = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.strip()}
    for case in files:
        assert str(case.path) in rows, case.path
        assert " error " in rows[str(case.path)], rows[str(case.path)]


@pytest.mark.slow
def test_console_script_masks_on_the_mixed_folder(bad_inputs: dict[str, BadInput], tmp_path: Path):
    case = bad_inputs["mixed-folder"]
    out = subprocess.run(
        [OMNIENC, "masks", str(case.folder), "--cache-dir", str(tmp_path), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for path, _ in case.expect["masks"].details:
        assert f"omnienc: WARNING: skipping {path}: " in out.stderr, out.stderr
    assert "anatomical.nii" in out.stdout and "example_mr_sm.nii.gz" in out.stdout


@pytest.mark.slow
def test_console_script_error_is_one_line(bad_inputs: dict[str, BadInput]):
    case = bad_inputs["bitflip-gzip-late"]
    out = subprocess.run(
        [OMNIENC, "info", str(case.path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        next(ln for ln in out.stderr.splitlines() if ln.startswith("omnienc: error: "))
    ]
    assert str(case.path) in out.stderr and "CRC" in out.stderr


def test_generators_refuse_a_missing_data_root(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="real file needed"):
        make_bad_inputs(tmp_path / "no-volumes", tmp_path / "out")
    restore_permissions(tmp_path)


def test_the_judge_rejects_vague_errors_tracebacks_and_silent_skips(
    bad_inputs: dict[str, BadInput],
):
    """The matrix is only as strict as its judge: check that it fails what it must."""
    from omnienc.benchmarks.robustness.observation import Observation

    case = bad_inputs["truncated-nii-gz"]
    path = str(case.path)
    named = f"{path}: truncated or corrupt compressed data"
    assert judge(case, "read_volume", Observation("error", named)).passed
    # The message must name the file, and say what is wrong with it.
    assert not judge(case, "read_volume", Observation("error", "truncated or corrupt")).passed
    assert not judge(case, "read_volume", Observation("error", f"{path}: bad file")).passed
    # On the command line: exactly one error line, and no traceback.
    cli_ok = Observation("error", f"omnienc: error: {named}\n", exit_code=1)
    assert judge(case, "info", cli_ok).passed
    two = Observation("error", f"omnienc: error: {named}\nomnienc: error: again\n", exit_code=1)
    assert not judge(case, "info", two).passed
    assert not judge(case, "info", Observation("crash", "Traceback ...", exit_code=1)).passed
    # A folder run must go on AND warn about the file; accepting it silently is a failure.
    assert judge(case, "masks", Observation("skip", warnings=[f"skipping {named}"])).passed
    assert not judge(case, "masks", Observation("ok")).passed
    assert not judge(case, "masks", Observation("skip", warnings=["skipping something"])).passed
    assert not judge(case, "masks", Observation("error", named, exit_code=1)).passed
