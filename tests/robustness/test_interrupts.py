"""Interrupted ``omnienc pretrain`` runs: SIGKILL mid-epoch and mid-checkpoint-write, resume.

The slow test drives :func:`omnienc.benchmarks.robustness.interrupts.run_kill_scenarios` (the same
runs ``benchmarks/results/robustness.md`` reports); the fast ones check the pieces it relies on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from omnienc.atomic import pid_alive
from omnienc.benchmarks.robustness.interrupts import MAX_STEPS, leftovers, run_kill_scenarios
from omnienc.pretext.train import FAULT_ENV, clean_interrupted_run, injected_fault


def _dead_pid() -> int:
    pid = 4_000_000
    while pid_alive(pid):
        pid -= 1
    return pid


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume(tmp_path: Path):
    rows = {r["scenario"]: r for r in run_kill_scenarios(tmp_path)}
    assert set(rows) == {"mid_epoch", "in_checkpoint_write"}
    assert rows["mid_epoch"]["killed_at"] == 6  # halfway through the second 4-step epoch
    assert rows["in_checkpoint_write"]["killed_at"] == 8
    for name, row in rows.items():
        assert row["problems"] == "", (name, row["problems"])
        assert row["resumed_from"] == 4, row  # the last complete checkpoint
        assert row["resumed_to_step"] == MAX_STEPS, row
        assert row["loss_match"] and row["max_loss_diff"] is not None, row
        assert row["leftovers"] == 0, row
        assert row["ok"], row


def test_fault_variable_is_parsed_strictly(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert injected_fault("kill_in_save") is None
    monkeypatch.setenv(FAULT_ENV, "kill_in_save=3")
    assert injected_fault("kill_in_save") == 3
    assert injected_fault("stop_at_step") is None
    for bad in ("kill_in_save", "kill_in_save=0", "kill_in_save=x", "explode=1"):
        monkeypatch.setenv(FAULT_ENV, bad)
        with pytest.raises(ValueError, match="for tests only"):
            injected_fault("kill_in_save")


def test_a_new_run_removes_a_killed_writers_checkpoint_temporary(tmp_path: Path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"complete")
    dead = ckpts / f".last.ckpt.tmp-{_dead_pid()}-0123abcd"
    dead.write_bytes(b"half")
    live = ckpts / f".last.ckpt.tmp-{os.getpid()}-89abcdef"  # a writer still running
    live.write_bytes(b"busy")
    assert leftovers(tmp_path) == sorted([dead, live])
    assert clean_interrupted_run(tmp_path) == [dead]
    assert (ckpts / "last.ckpt").read_bytes() == b"complete" and live.exists()
