"""The robustness benchmark: bad inputs x public entry points, checkpoint attacks, kills, memory.

Every bad input of :mod:`omnienc.benchmarks.robustness.badinputs` (made from the real files of the
data root) goes to every public entry point (``read_volume``, ``VolumeFolder``, ``omnienc info``,
``omnienc masks``, ``omnienc pretrain``, ``omnienc embed``, ``omnienc segment``); each outcome is
judged against what the case expects: the documented error naming the file and the problem (one
line, non-zero exit, no traceback on the command line), or the file skipped with a warning naming it
while the run goes on. Then every checkpoint attack of
:mod:`omnienc.benchmarks.robustness.badcheckpoints` (pickle payloads, tampered files, other
architectures) goes to every loader; then the kill/resume scenarios and peak-memory measurements of
``omnienc.benchmarks.robustness.interrupts`` and ``omnienc.benchmarks.robustness.memory``. The
results go to ``benchmarks/results/robustness.{md,json}``.

The command line runs in process (``omnienc.cli.main``) with stdout, stderr and the
``omnienc`` log captured, as a user's terminal would show them. Cases about file permissions
run, as root, in a child process that has dropped ``CAP_DAC_OVERRIDE`` and
``CAP_DAC_READ_SEARCH`` (root reads mode-000 files otherwise).

Run::

    python -m omnienc.benchmarks.robustness            # -> benchmarks/results/robustness.*
    python -m omnienc.benchmarks.robustness --quick    # no pretrain runs, no memory at 512^2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omnienc.benchmarks.report import write_report
from omnienc.benchmarks.robustness.cases import ENTRY_POINTS, BadInput
from omnienc.benchmarks.robustness.observation import RunContext, Verdict, judge, observe
from omnienc.benchmarks.robustness.privileges import (
    _case_to_json,
    _child_main,
    dac_override_active,
    observe_without_dac_override,
)
from omnienc.benchmarks.robustness.tables import format_markdown

RESULTS = Path(__file__).resolve().parents[1] / "results"
SHIPPED_CHECKPOINT = Path("checkpoints/omnienc-cpu30min")


# --------------------------------------------------------------------------------------------
# The whole matrix


def run_matrix(
    cases: Sequence[BadInput],
    ctx: RunContext,
    entries: Sequence[str] = ENTRY_POINTS,
    progress: bool = True,
) -> list[Verdict]:
    """Every case through every entry point that applies to it; permission cases in a child.

    Returns:
        One :class:`Verdict` per (case, entry point) whose expectation is not ``n/a``.
    """
    jobs = [(c, e) for c in cases for e in entries if c.expect[e].outcome != "n/a"]
    in_child = [(c, e) for c, e in jobs if c.unreadable and dac_override_active()]
    child_obs = dict(
        zip(
            [(c.name, e) for c, e in in_child],
            observe_without_dac_override(in_child, ctx) if in_child else [],
            strict=True,
        )
    )
    verdicts = []
    for i, (case, entry) in enumerate(jobs):
        obs = child_obs.get((case.name, entry)) or observe(case, entry, ctx)
        v = judge(case, entry, obs)
        verdicts.append(v)
        if progress:
            mark = "ok  " if v.passed else "FAIL"
            print(
                f"[{i + 1}/{len(jobs)}] {mark} {case.name} / {entry}: {v.observed} "
                f"({v.seconds:.1f} s)",
                file=sys.stderr,
            )
    return verdicts


# --------------------------------------------------------------------------------------------
# Results


def _part_b(
    quick: bool, work: Path
) -> tuple[list[dict[str, Any]] | str, list[dict[str, Any]] | str]:
    """Part B's kill scenarios and memory peaks, or why they are missing."""
    import importlib

    def run(module: str, function: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]] | str:
        try:
            fn = getattr(
                importlib.import_module(f"omnienc.benchmarks.robustness.{module}"), function
            )
        except (ImportError, AttributeError) as exc:
            name = f"omnienc.benchmarks.robustness.{module}.{function}"
            return f"not run: {name} is not available ({exc})"
        try:
            return list(fn(*args, **kwargs))
        except Exception as exc:  # report the failure in the table rather than lose the run
            return f"failed: {type(exc).__name__}: {exc}"

    kills = run("interrupts", "run_kill_scenarios", work / "kills")
    peaks = run("memory", "measure_peaks", quick=quick)
    return kills, peaks


def _machine() -> str:
    from omnienc.benchmarks.machine import cpu_model, load_average

    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, load {load_average():.2f}; "
        f"Python {platform.python_version()}; {platform.platform()}; "
        f"{'root' if os.geteuid() == 0 else 'user'}"
    )


def build_context(volumes: Path, work: Path, checkpoint: Path, embed_encoder: str) -> RunContext:
    """A :class:`RunContext`; checks that the checkpoint has an in-context head."""
    from omnienc.checkpoint import load_checkpoint_config

    extra = load_checkpoint_config(checkpoint).get("extra") or {}
    if "incontext_head" not in extra:
        raise SystemExit(f"{checkpoint}: needs an in-context head for `omnienc segment`")
    return RunContext(volumes, work, checkpoint, embed_encoder)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m omnienc.benchmarks.robustness``."""
    parser = argparse.ArgumentParser(
        prog="python -m omnienc.benchmarks.robustness", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="skip pretrain runs; quick memory")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("--embed-encoder", help="default: the checkpoint")
    parser.add_argument("--data", help="data root (default $OMNIENC_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=RESULTS / "robustness", help="no suffix")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main()

    from omnienc.benchmarks.robustness.badcheckpoints import run_checkpoint_attacks
    from omnienc.benchmarks.robustness.badinputs import make_bad_inputs, restore_permissions
    from omnienc.checkpoint import file_sha256
    from omnienc.data.root import resolve_data_root

    start = time.perf_counter()
    volumes = resolve_data_root(args.data) / "volumes"
    command = "python -m omnienc.benchmarks.robustness " + shlex.join(list(argv or sys.argv[1:]))
    entries = [e for e in ENTRY_POINTS if not (args.quick and e == "pretrain")]
    with tempfile.TemporaryDirectory(prefix="omnienc-robustness-") as tmp:
        work = Path(tmp)
        try:
            cases = make_bad_inputs(volumes, work / "inputs")
            ctx = build_context(
                volumes, work / "run", args.checkpoint, args.embed_encoder or str(args.checkpoint)
            )
            verdicts = run_matrix(cases, ctx, entries)
            attacks = run_checkpoint_attacks(work / "attacks", args.checkpoint, volumes)
            kills, memory = _part_b(args.quick, work)
        finally:
            restore_permissions(work)
    doc: dict[str, Any] = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "seconds": time.perf_counter() - start,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": file_sha256(args.checkpoint / "config.json"),
        "embed_encoder": args.embed_encoder or str(args.checkpoint),
        "entries": entries,
        "cases": [_case_to_json(c) for c in cases],
        "verdicts": [asdict(v) for v in verdicts],
        "attacks": attacks,
        "kills": kills,
        "memory": memory,
    }
    for v in doc["verdicts"]:  # a skip's reason quotes every warning: keep the file small
        v["reason"] = v["reason"][:600]
    # The scratch folder's random name says nothing: show it as <tmp>; the data root as <data>.
    text = json.dumps(doc).replace(str(work), "<tmp>").replace(str(volumes.parent), "<data>")
    doc = json.loads(text)
    md = format_markdown(doc)
    write_report(args.out, doc, md)
    print(md)
    failed = [v for v in verdicts if not v.passed] + [
        a for a in attacks if not a["refused"] or a["executed"]
    ]
    print(f"wrote {args.out}.json and .md; {len(failed)} checks not as expected", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
