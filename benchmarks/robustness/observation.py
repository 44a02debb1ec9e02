"""One bad input through one entry point: what happened (:class:`Observation`) and the verdict.

:func:`observe` hands a case to a public entry point (``read_volume``, ``VolumeFolder``, or an
``omnienc`` subcommand run in process by :func:`run_cli`, with stdout, stderr and the
``omnienc`` log captured as a user's terminal would show them); :func:`judge` compares the
outcome with what the case expects (:class:`~omnienc.benchmarks.robustness.badinputs.Expect`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnienc.benchmarks.robustness.cases import (
    ENTRY_POINTS,
    FILE_ENTRIES,
    MR,
    MR_SEG,
    BadInput,
    Expect,
)


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
