"""Interrupted pretraining: ``omnienc pretrain`` killed with SIGKILL, then resumed.

Two kills, each at a deterministic point set by the test-only fault variable
:data:`omnienc.pretext.train.FAULT_ENV` (no timing luck):

* ``mid_epoch``: the run stops itself (SIGSTOP) after optimiser step 6 of 12, halfway through its
  second 4-step epoch, and this driver SIGKILLs it from outside;
* ``in_checkpoint_write``: the run SIGKILLs itself during its second checkpoint write (step 8),
  after the temporary file is complete and before it is renamed to ``last.ckpt``.

Then the same command runs again and must resume. A scenario is ``ok`` when, after the kill,
``last.ckpt`` is the last complete checkpoint (step 4) and the exported encoder loads; the resumed
run loads it, trains to the same final step as an uninterrupted run (12), logs the same loss as
that run at every step it trains (deterministic mode on CPU), and leaves no temporary or
half-written checkpoint, encoder export or cache file behind.

The runs use the tiny recipe of ``tests/test_pretrain.py`` (``resconv_tiny``, batch 2, 32^3 crops,
3 mm spacing) on three real volumes from the data root. About a minute on 2 CPU cores::

    python -m omnienc.benchmarks.robustness.interrupts --work /tmp/interrupts
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.data.root import resolve_data_root
from omnienc.errors import OmniencError
from omnienc.pretext.train import FAULT_ENV

# Three small real volumes (CT, MR, MR), as in tests/test_pretrain.py.
VOLUMES = (
    "totalsegmentator/example_ct_sm.nii.gz",
    "totalsegmentator/example_mr_sm.nii.gz",
    "nibabel/anatomical.nii",
)
STEPS_PER_EPOCH = 4
MAX_STEPS = 12
STOP_AT_STEP = 6  # mid-epoch: the second epoch runs steps 5..8
KILL_IN_SAVE = 2  # the second checkpoint write, at step 8
LAST_COMPLETE = 4  # the checkpoint both kills fall back to
TIMEOUT_S = 600
# Hidden temporaries of omnienc.atomic writers (.NAME.tmp-HOST-PID-HEX, .NAME.old-HOST-PID-HEX,
# and the older .NAME.tmp-PID-HEX).
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(?:[A-Za-z0-9._]+-)?\d+-[0-9a-f]{8}")


def omnienc_command() -> list[str]:
    """The ``omnienc`` console script of this interpreter, or ``python -m omnienc.cli``."""
    script = Path(sys.executable).with_name("omnienc")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "omnienc.cli"]


def prepare_data(work_dir: Path, data_root: str | Path | None = None) -> Path:
    """Copy :data:`VOLUMES` from the real data root into ``work_dir/data/volumes``.

    Returns:
        The new data root (``work_dir/data``).
    """
    source = resolve_data_root(data_root) / "volumes"
    root = work_dir / "data"
    dest = root / "volumes"
    dest.mkdir(parents=True, exist_ok=True)
    for rel in VOLUMES:
        shutil.copyfile(source / rel, dest / Path(rel).name)
    return root


def write_config(folder: Path, data_root: Path, cache_dir: Path) -> Path:
    """The run's YAML config (deterministic, CPU); the run folder is ``folder/run``."""
    cfg = {
        "model": {"encoder": "resconv_tiny", "warmup_steps": 2, "head": {"dim": 16}},
        "data": {
            "roots": ["volumes"],
            "batch_size": 2,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "pair": {"crop_size": [32, 32, 32], "max_tasks": 2},
            "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "cache_dir": str(cache_dir),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": MAX_STEPS,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "deterministic": True,
        },
        "data_root": str(data_root),
        "run_dir": str(folder / "run"),
        "seed": 0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


def _pretrain(config: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``omnienc pretrain --config CONFIG`` to its end (or its injected kill)."""
    return subprocess.run(
        [*omnienc_command(), "pretrain", "--config", str(config)],
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _wait_until_stopped(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until ``proc`` is stopped by a signal; raise if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid == 0:
            time.sleep(0.1)
            continue
        if os.WIFSTOPPED(status):
            return
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise RuntimeError(f"the run ended (status {proc.returncode}) before it stopped")
    raise TimeoutError(f"the run did not reach its stop point within {timeout:.0f} s")


def step_losses(run: Path, version: int | None = None) -> dict[int, float]:
    """Logged ``train/loss`` by step, from one CSV log version (default: all of them).

    A resumed run logs into a new ``logs/version_N``; a killed run's log may be cut short.
    """
    losses: dict[int, float] = {}
    pattern = f"version_{version}/metrics.csv" if version is not None else "version_*/metrics.csv"
    for path in sorted((run / "logs").glob(pattern)):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def _latest_version(run: Path) -> int:
    versions = [int(p.name.split("_")[1]) for p in (run / "logs").glob("version_*")]
    return max(versions)


def checkpoint_step(path: Path) -> int | None:
    """``global_step`` of a Lightning checkpoint, read weights-only; ``None`` if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return int(state["global_step"])


def leftovers(*folders: Path) -> list[Path]:
    """Temporaries or moved-aside copies of interrupted atomic writes under ``folders``."""
    found: list[Path] = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob(".*") if _TEMP.match(p.name)]
    return sorted(found)


def unreadable_cache_files(cache_dir: Path) -> list[Path]:
    """Cache ``.npz`` files that do not load completely (every array read, CRCs checked)."""
    bad = []
    for path in sorted(cache_dir.glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                for key in z.files:
                    z[key]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            bad.append(path)
    return bad


def _resume_and_check(
    name: str,
    config: Path,
    killed_at: int,
    reference: dict[int, float],
    cache_dir: Path,
    problems: list[str],
) -> dict[str, Any]:
    """Check the state a kill left, resume, and check the finished run; one result row."""
    run = config.parent / "run"
    last = run / "checkpoints" / "last.ckpt"
    resumed_from = checkpoint_step(last)
    if resumed_from != LAST_COMPLETE:
        problems.append(f"after the kill last.ckpt is at step {resumed_from}, not {LAST_COMPLETE}")
    try:
        load_encoder(run / "encoder")
    except OmniencError as exc:
        problems.append(f"the exported encoder does not load after the kill: {exc}")
    out = _pretrain(config)
    if out.returncode != 0:
        problems.append(f"resume exited {out.returncode}: {out.stderr.strip()[-500:]}")
    elif "resuming from" not in out.stderr:
        problems.append("the second run did not resume from last.ckpt")
    final = checkpoint_step(last)
    try:
        exported = int(load_checkpoint_config(run / "encoder")["meta"]["step"])
    except (OmniencError, KeyError, TypeError, ValueError):
        exported = None
    if exported != final:
        problems.append(f"the exported encoder is at step {exported}, last.ckpt at {final}")
    resumed = step_losses(run, _latest_version(run)) if (run / "logs").exists() else {}
    expected_steps = list(range(resumed_from or 0, MAX_STEPS))
    diffs = [abs(resumed[s] - reference[s]) for s in expected_steps if s in resumed]
    loss_match = sorted(resumed) == expected_steps and all(
        math.isclose(resumed[s], reference[s], rel_tol=1e-5, abs_tol=1e-6) for s in expected_steps
    )
    if not loss_match:
        problems.append(f"resumed losses {resumed} differ from the uninterrupted run's")
    left = leftovers(run, cache_dir)
    bad_cache = unreadable_cache_files(cache_dir)
    if bad_cache:
        problems.append(f"unreadable cache files: {[p.name for p in bad_cache]}")
    return {
        "scenario": name,
        "killed_at": killed_at,
        "resumed_from": resumed_from,
        "resumed_to_step": final,
        "loss_match": loss_match,
        "max_loss_diff": max(diffs) if diffs else None,
        "leftovers": len(left) + len(bad_cache),
        "ok": not problems and not left and final == MAX_STEPS,
        "problems": "; ".join(problems + [f"left behind: {p}" for p in left]),
    }


def run_kill_scenarios(work_dir: Path) -> list[dict[str, Any]]:
    """Kill ``omnienc pretrain`` mid-epoch and mid-checkpoint-write, resume, compare.

    Args:
        work_dir: An empty scratch folder (data copies, caches and run folders go here).

    Returns:
        One row per scenario: ``scenario``, ``killed_at`` (the step at the kill),
        ``resumed_from`` (step of the checkpoint the resume loaded), ``resumed_to_step`` (the
        final step), ``loss_match`` (every resumed step's loss equals the uninterrupted run's),
        ``max_loss_diff``, ``leftovers`` (temporary, moved-aside or unreadable files left in
        the run and cache folders), ``ok``, ``problems`` (what failed, in words), ``seconds``.

    Raises:
        RuntimeError: The uninterrupted reference run fails.
    """
    work_dir = Path(work_dir)
    data_root = prepare_data(work_dir)
    cache_dir = work_dir / "cache"  # shared: the reference run fills it, the others reuse it

    reference_cfg = write_config(work_dir / "uninterrupted", data_root, cache_dir)
    out = _pretrain(reference_cfg)
    if out.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {out.stderr.strip()[-2000:]}")
    reference = step_losses(reference_cfg.parent / "run")
    if sorted(reference) != list(range(MAX_STEPS)):
        raise RuntimeError(f"the uninterrupted run logged steps {sorted(reference)}")

    rows = []
    # 1. SIGKILL from outside, mid-epoch.
    start = time.perf_counter()
    problems: list[str] = []
    cfg = write_config(work_dir / "mid_epoch", data_root, cache_dir)
    proc = subprocess.Popen(
        [*omnienc_command(), "pretrain", "--config", str(cfg)],
        env=_env(f"stop_at_step={STOP_AT_STEP}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_stopped(proc, TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        problems.append(str(exc))
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    row = _resume_and_check("mid_epoch", cfg, STOP_AT_STEP, reference, cache_dir, problems)
    rows.append({**row, "seconds": round(time.perf_counter() - start, 1)})

    # 2. SIGKILL inside the checkpoint write, between the complete temporary and the rename.
    start = time.perf_counter()
    problems = []
    cfg = write_config(work_dir / "in_checkpoint_write", data_root, cache_dir)
    out = _pretrain(cfg, fault=f"kill_in_save={KILL_IN_SAVE}")
    if out.returncode != -signal.SIGKILL:
        problems.append(f"the run was not killed in its checkpoint write (status {out.returncode})")
    ckpt_dir = cfg.parent / "run" / "checkpoints"
    if not [p for p in leftovers(ckpt_dir) if p.name.startswith(".last.ckpt.tmp-")]:
        problems.append("no temporary checkpoint was left: the kill did not land mid-write")
    killed_at = KILL_IN_SAVE * STEPS_PER_EPOCH
    row = _resume_and_check("in_checkpoint_write", cfg, killed_at, reference, cache_dir, problems)
    rows.append({**row, "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the kill scenarios and print one line per scenario; exit 1 if any is not ok."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="empty scratch folder")
    args = parser.parse_args(argv)
    rows = run_kill_scenarios(args.work)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
