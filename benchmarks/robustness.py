"""The robustness benchmark: bad inputs x public entry points, checkpoint attacks, kills, memory.

Every bad input of :mod:`omnienc.benchmarks.badinputs` (made from the real files of the data
root) goes to every public entry point (``read_volume``, ``VolumeFolder``, ``omnienc info``,
``omnienc masks``, ``omnienc pretrain``, ``omnienc embed``, ``omnienc segment``); each outcome
is judged against what the case expects: the documented error naming the file and the problem
(one line, non-zero exit, no traceback on the command line), or the file skipped with a warning
naming it while the run goes on. Then every checkpoint attack of
:mod:`omnienc.benchmarks.badcheckpoints` (pickle payloads, tampered files, other architectures)
goes to every loader; then the kill/resume scenarios and peak-memory measurements of
``omnienc.benchmarks.interrupts`` and ``omnienc.benchmarks.memory``. The results go to
``benchmarks/results/robustness.{md,json}``.

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
import contextlib
import ctypes
import io
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omnienc.benchmarks.badinputs import ENTRY_POINTS, FILE_ENTRIES, MR, MR_SEG, BadInput, Expect

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED_CHECKPOINT = Path("checkpoints/omnienc-cpu30min")
# Linux capability numbers (linux/capability.h) and prctl(PR_CAPBSET_DROP).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


@dataclass
class Observation:
    """What one entry point did with one case.

    Attributes:
        outcome: ``error`` (raised / exited non-zero), ``skip`` (went on, with warnings),
            ``ok`` (went on, no warning), ``crash`` (a non-omnienc exception, or a traceback on
            the command line) or ``untestable`` (see ``message``).
        message: The error message (for the CLI: what it printed to stderr).
        warnings: Warnings the ``omnienc`` logger emitted.
        error_type: Class name of the exception, if any.
        exit_code: The CLI's exit status (``None`` for the Python entry points).
        seconds: Wall time.
    """

    outcome: str
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    error_type: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0


@dataclass
class Verdict:
    """An observation judged against the case's expectation."""

    case: str
    kind: str
    entry: str
    expected: str
    observed: str
    passed: bool
    reason: str
    seconds: float


@dataclass
class RunContext:
    """Everything the entry points need besides the bad input.

    Attributes:
        volumes: ``<data root>/volumes`` (support image and mask of ``segment``).
        work: Scratch folder for outputs, caches and pretraining runs.
        checkpoint: An exported encoder with an in-context head (``omnienc segment``).
        embed_encoder: Checkpoint folder, or ``random:ARCH`` for a random-init encoder.
    """

    volumes: Path
    work: Path
    checkpoint: Path
    embed_encoder: str = "random:resconv_tiny"

    @property
    def cache(self) -> Path:
        return self.work / "cache"


# --------------------------------------------------------------------------------------------
# Capturing what a user would see


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO, _ListHandler]]:
    """Capture stdout, stderr and the ``omnienc`` logger's warnings."""
    out, err = io.StringIO(), io.StringIO()
    handler = _ListHandler()
    logger = logging.getLogger("omnienc")
    root = logging.getLogger()
    # Without a root handler the CLI's logging.basicConfig would bind one to this StringIO.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    logger.addHandler(handler)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        if placeholder is not None:
            root.removeHandler(placeholder)


def _run_python(fn: Callable[[], Any]) -> Observation:
    """Run a Python entry point: an OmniencError is an ``error``, any other exception a crash."""
    from omnienc.errors import OmniencError

    start = time.perf_counter()
    with _captured() as (_, _, handler):
        try:
            result = fn()
        except OmniencError as exc:
            return Observation(
                "error",
                str(exc),
                handler.messages,
                type(exc).__name__,
                seconds=time.perf_counter() - start,
            )
        except Exception as exc:
            return Observation(
                "crash",
                "".join(traceback.format_exception(exc))[-3000:],
                handler.messages,
                type(exc).__name__,
                seconds=time.perf_counter() - start,
            )
    skipped = getattr(result, "skipped", [])
    warnings = handler.messages + [problem for _, problem in skipped]
    outcome = "skip" if handler.messages or skipped else "ok"
    return Observation(outcome, "", warnings, seconds=time.perf_counter() - start)


def run_cli(argv: Sequence[str]) -> Observation:
    """Run ``omnienc ARGV`` in process and report what its user would see.

    A non-zero exit is an ``error`` (its message is stderr); exit 0 with warnings a ``skip``;
    an exception escaping ``main`` or a ``Traceback`` on stderr is a ``crash``.
    """
    from omnienc.cli import main

    start = time.perf_counter()
    with _captured() as (out, err, handler):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse, or a command's own usage message
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException as exc:
            tb = "".join(traceback.format_exception(exc))
            return Observation(
                "crash",
                err.getvalue() + tb[-3000:],
                handler.messages,
                type(exc).__name__,
                seconds=time.perf_counter() - start,
            )
    stderr = err.getvalue()
    seconds = time.perf_counter() - start
    if "Traceback (most recent call last)" in stderr:
        return Observation("crash", stderr[-3000:], handler.messages, None, code, seconds)
    if code != 0:
        return Observation("error", stderr, handler.messages, None, code, seconds)
    outcome = "skip" if handler.messages else "ok"
    return Observation(outcome, out.getvalue()[-2000:], handler.messages, None, code, seconds)


# --------------------------------------------------------------------------------------------
# The entry points


def _pretrain_config(case: BadInput, ctx: RunContext) -> Path:
    """A tiny pretraining config (resconv_tiny, 32^3 crops, one step) on the case's folder."""
    import yaml

    run = ctx.work / "pretrain" / case.name
    run.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"encoder": "resconv_tiny", "warmup_steps": 0, "head": {"dim": 16}},
        "data": {
            "roots": [str(case.folder)],
            "batch_size": 2,
            "steps_per_epoch": 1,
            "min_size": 8,
            "pair": {"crop_size": [32, 32, 32], "max_tasks": 2},
            "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "cache_dir": str(ctx.cache),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "data_root": str(case.folder),
        "run_dir": str(run / "run"),
        "resume": "never",
        "seed": 0,
    }
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _encoder_args(spec: str) -> list[str]:
    return ["--random", spec.split(":", 1)[1]] if spec.startswith("random:") else [spec]


def observe(case: BadInput, entry: str, ctx: RunContext) -> Observation:
    """Hand ``case`` to one entry point and record what happened.

    File entry points get ``case.path``; folder entry points get ``case.folder``. A label-map
    case goes to ``segment`` as the support mask of the real image it was made from.
    """
    out = ctx.work / "out" / case.name / entry
    out.mkdir(parents=True, exist_ok=True)
    target = str(case.path if entry in FILE_ENTRIES else case.folder)
    cache = ["--cache-dir", str(ctx.cache)]
    if entry == "read_volume":
        from omnienc.io import read_volume

        return _run_python(lambda: read_volume(case.path))
    if entry == "VolumeFolder":
        from omnienc.data.folder import VolumeFolder

        return _run_python(lambda: VolumeFolder(case.folder, cache_dir=ctx.cache, progress=False))
    if entry == "info":
        return run_cli(["info", target, *cache, "-q"])
    if entry == "masks":
        return run_cli(["masks", target, *cache, "-q"])
    if entry == "embed":
        args = _encoder_args(ctx.embed_encoder)
        return run_cli(["embed", *args, target, "-o", str(out / "f.npz"), *cache, "-q"])
    if entry == "segment":
        image, mask, query = ctx.volumes / MR, ctx.volumes / MR_SEG, ctx.volumes / MR
        if case.role == "label":
            mask = case.path
        else:
            query = case.path
        argv = ["segment", str(ctx.checkpoint), "--support", str(image), str(mask)]
        return run_cli([*argv, "--query", str(query), "-o", str(out / "mask.nii.gz")])
    if entry == "pretrain":
        return run_cli(["pretrain", "--config", str(_pretrain_config(case, ctx))])
    raise ValueError(f"unknown entry point {entry!r}; known: {ENTRY_POINTS}")


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"omnienc( \w+)?: error: ", ln)]


def judge(case: BadInput, entry: str, obs: Observation) -> Verdict:
    """Compare an observation with what ``case.expect[entry]`` asks for.

    * ``error``: the entry point raised an omnienc error (Python) or exited non-zero with one
      ``omnienc: error:`` line (CLI), and that one message names every expected path and
      matches every expected problem; no traceback.
    * ``skip``: it went on (returned / exit 0), and for every expected path a warning names it
      and matches its problem.
    * ``ok``: it went on without warnings.
    """
    expect = case.expect.get(entry, Expect("n/a"))

    def verdict(passed: bool, reason: str) -> Verdict:
        return Verdict(
            case.name, case.kind, entry, expect.outcome, obs.outcome, passed, reason, obs.seconds
        )

    if obs.outcome == "untestable":
        return verdict(False, obs.message)
    if obs.outcome == "crash":
        return verdict(False, f"crash ({obs.error_type}): {obs.message[-1500:]}")
    if obs.outcome != expect.outcome:
        detail = obs.message or "; ".join(obs.warnings)
        return verdict(False, f"expected {expect.outcome}, got {obs.outcome}: {detail[-1500:]}")
    if expect.outcome == "error":
        if obs.exit_code is not None:  # the CLI: one line saying what is wrong
            lines = _error_lines(obs.message)
            if len(lines) != 1:
                return verdict(False, f"expected one 'omnienc: error:' line, got {obs.message!r}")
            message = lines[0]
        else:
            message = obs.message
        for path, problem in expect.details:
            if str(path) not in message:
                return verdict(False, f"message does not name {path}: {message!r}")
            if not re.search(problem, message):
                return verdict(False, f"message does not match {problem!r}: {message!r}")
        return verdict(True, message)
    if expect.outcome == "skip":
        said = []
        for path, problem in expect.details:
            hits = [w for w in obs.warnings if str(path) in w and re.search(problem, w)]
            if not hits:
                return verdict(
                    False, f"no warning names {path} with {problem!r}; warnings: {obs.warnings}"
                )
            said.append(hits[0])
        return verdict(True, " | ".join(said))
    return verdict(True, "")


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
            fn = getattr(importlib.import_module(f"omnienc.benchmarks.{module}"), function)
        except (ImportError, AttributeError) as exc:
            return f"not run: omnienc.benchmarks.{module}.{function} is not available ({exc})"
        try:
            return list(fn(*args, **kwargs))
        except Exception as exc:  # report the failure in the table rather than lose the run
            return f"failed: {type(exc).__name__}: {exc}"

    kills = run("interrupts", "run_kill_scenarios", work / "kills")
    peaks = run("memory", "measure_peaks", quick=quick)
    return kills, peaks


def _md_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_markdown(doc: dict[str, Any]) -> str:
    """The Markdown report of :func:`main`'s JSON document."""
    cases = {c["name"]: c for c in doc["cases"]}
    verdicts = doc["verdicts"]
    lines = [
        "# Robustness: bad inputs, untrusted checkpoints, kills, memory",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}; machine: {doc['machine']}; {doc['seconds']:.0f} s in all  ",
        f"Checkpoint: `{doc['checkpoint']}` (config.json sha256 `{doc['checkpoint_sha256'][:16]}`)"
        f"; embed encoder: `{doc['embed_encoder']}`",
        "",
        "Every bad input is made at run time from a real file of `../shared/data/volumes` "
        "(`omnienc.benchmarks.badinputs`) and handed to each public entry point. *error*: the "
        "documented omnienc error naming the file and the problem (the CLI: one "
        "`omnienc: error:` line, non-zero exit, no traceback); *skip*: the file is skipped "
        "with a warning naming it and the run goes on; *ok*: accepted; ✗ marks an outcome "
        "other than the expected one.",
        "",
        f"**{sum(int(v['passed']) for v in verdicts)} of {len(verdicts)} entry-point checks as "
        f"expected; {sum(v['observed'] == 'crash' for v in verdicts)} crashes (a traceback or a "
        "non-omnienc exception).**",
        "",
        "## Bad inputs by kind",
        "",
    ]
    kinds: dict[str, dict[str, int]] = {}
    for c in doc["cases"]:
        k = kinds.setdefault(c["kind"], {"cases": 0, "checks": 0, "passed": 0})
        k["cases"] += 1
    for v in verdicts:
        kinds[v["kind"]]["checks"] += 1
        kinds[v["kind"]]["passed"] += int(v["passed"])
    rows = [
        {
            "kind": k,
            "inputs": n["cases"],
            "entry-point checks": n["checks"],
            "as expected": n["passed"],
        }
        for k, n in kinds.items()
    ]
    total = {
        "kind": "**all**",
        "inputs": sum(n["cases"] for n in kinds.values()),
        "entry-point checks": len(verdicts),
        "as expected": sum(int(v["passed"]) for v in verdicts),
    }
    lines += _md_table([*rows, total])
    lines += ["", "## Outcome of each input at each entry point", ""]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for v in verdicts:
        by_case.setdefault(v["case"], {})[v["entry"]] = v
    table = []
    for name, c in cases.items():
        row: dict[str, Any] = {"kind": c["kind"], "input": f"`{name}`"}
        for e in doc["entries"]:
            v = by_case.get(name, {}).get(e)
            row[e] = "n/a" if v is None else v["observed"] + ("" if v["passed"] else " ✗")
        row["made from"] = c["note"] or c["source"]
        table.append(row)
    lines += _md_table(table)
    failures = [v for v in verdicts if not v["passed"]]
    if failures:
        lines += ["", "### Not as expected", ""]
        for v in failures:
            lines.append(f"- `{v['case']}` / {v['entry']}: {v['reason'][:400]}")
    lines += ["", "### What the user reads (the first error of each kind)", ""]
    seen: set[str] = set()
    for entry in ("info", "segment", "read_volume"):
        for v in verdicts:
            if v["entry"] == entry and v["expected"] == "error" and v["passed"]:
                if v["kind"] not in seen:
                    seen.add(v["kind"])
                    lines.append(f"- {v['kind']} (`{v['case']}`, {entry}): `{v['reason'][:300]}`")
    lines += ["", "## Untrusted checkpoints", ""]
    attacks = doc["attacks"]
    refused = sum(int(a["refused"] and not a["executed"]) for a in attacks)
    lines.append(
        f"{refused} of {len(attacks)} attacks refused with nothing executed (a pickle payload "
        "whose `__reduce__` would create a marker file; the marker is checked after each)."
    )
    lines.append("")
    lines += _md_table(
        [
            {
                "attack": a["attack"],
                "handed to": a["entry"],
                "refused": "yes" if a["refused"] else "NO",
                "payload ran": "YES" if a["executed"] else "no",
                "message": a["message"][:220],
            }
            for a in attacks
        ]
    )
    lines += ["", "## Kills survived (part B: `omnienc.benchmarks.interrupts`)", ""]
    lines += [doc["kills"]] if isinstance(doc["kills"], str) else _md_table(doc["kills"])
    lines += ["", "## Peak memory (part B: `omnienc.benchmarks.memory`)", ""]
    lines += [doc["memory"]] if isinstance(doc["memory"], str) else _md_table(doc["memory"])
    return "\n".join(lines) + "\n"


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

    from omnienc.atomic import write_bytes_atomic
    from omnienc.benchmarks.badcheckpoints import run_checkpoint_attacks
    from omnienc.benchmarks.badinputs import make_bad_inputs, restore_permissions
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out.with_suffix(".json"), json.dumps(doc, indent=2).encode())
    md = format_markdown(doc)
    write_bytes_atomic(args.out.with_suffix(".md"), md.encode())
    print(md)
    failed = [v for v in verdicts if not v.passed] + [
        a for a in attacks if not a["refused"] or a["executed"]
    ]
    print(f"wrote {args.out}.json and .md; {len(failed)} checks not as expected", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
