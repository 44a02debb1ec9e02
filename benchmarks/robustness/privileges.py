"""Permission cases as root: observed in a child process without ``CAP_DAC_OVERRIDE``.

Root reads mode-000 files, so cases about file permissions run in a child
(``python -m omnienc.benchmarks.robustness --child``) that has dropped ``CAP_DAC_OVERRIDE`` and
``CAP_DAC_READ_SEARCH`` from its capability bounding set; cases go there and back as JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omnienc.benchmarks.robustness.cases import BadInput, Expect
from omnienc.benchmarks.robustness.observation import Observation, RunContext, observe

# Linux capability numbers (linux/capability.h) and prctl(PR_CAPBSET_DROP).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


# --------------------------------------------------------------------------------------------
# Permission cases as root: a child process without the capabilities that bypass file modes


def dac_override_active() -> bool:
    """Whether this process reads files whatever their mode (root with ``CAP_DAC_OVERRIDE``)."""
    if os.geteuid() != 0:
        return False
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << _CAP_DAC_OVERRIDE))
    except OSError:
        pass
    return True


def _drop_dac_capabilities() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _case_to_json(case: BadInput) -> dict[str, Any]:
    d = asdict(case)
    d["path"], d["folder"] = str(case.path), str(case.folder)
    d["expect"] = {
        k: {"outcome": e.outcome, "details": [[str(p), r] for p, r in e.details]}
        for k, e in case.expect.items()
    }
    return d


def _case_from_json(d: dict[str, Any]) -> BadInput:
    expect = {
        k: Expect(e["outcome"], tuple((Path(p), r) for p, r in e["details"]))
        for k, e in d["expect"].items()
    }
    return BadInput(
        d["kind"],
        d["name"],
        Path(d["path"]),
        Path(d["folder"]),
        d["source"],
        expect,
        d["role"],
        d["unreadable"],
        d["note"],
    )


def observe_without_dac_override(
    jobs: Sequence[tuple[BadInput, str]], ctx: RunContext, timeout: float = 900
) -> list[Observation]:
    """Run ``jobs`` in a child process that file modes apply to, even when started as root.

    Returns one :class:`Observation` per job; all ``untestable`` (with the reason) where such a
    child cannot be started (no ``CAP_SETPCAP`` to drop capabilities, not Linux).
    """
    payload = {
        "jobs": [[_case_to_json(c), e] for c, e in jobs],
        "ctx": {k: str(v) for k, v in asdict(ctx).items()},
    }
    preexec = _drop_dac_capabilities if dac_override_active() else None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "omnienc.benchmarks.robustness", "--child"],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=preexec,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"cannot start a child without CAP_DAC_OVERRIDE: {exc}"
        return [Observation("untestable", reason) for _ in jobs]
    if proc.returncode != 0:
        reason = f"child failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
        return [Observation("crash", reason) for _ in jobs]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Observation(**r) for r in rows]


def _child_main() -> int:
    payload = json.loads(sys.stdin.read())
    c = payload["ctx"]
    ctx = RunContext(Path(c["volumes"]), Path(c["work"]), Path(c["checkpoint"]), c["embed_encoder"])
    rows = []
    for case_json, entry in payload["jobs"]:
        rows.append(asdict(observe(_case_from_json(case_json), entry, ctx)))
    print(json.dumps(rows))
    return 0
