"""What the few-shot diagnostics share: interval text and the command-line driver.

The diagnostics (:mod:`~omnienc.benchmarks.fewshot_localise`,
:mod:`~omnienc.benchmarks.fewshot_negatives`) each run the few-shot benchmark with a
:class:`~omnienc.benchmarks.fewshot_rows.FewshotRun` subclass and write one JSON + Markdown
report; :func:`diagnostic_main` is their ``main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omnienc.benchmarks.fewshot import SHIPPED_CHECKPOINT
from omnienc.benchmarks.report import write_report
from omnienc.errors import OmniencError


def interval_text(s: dict[str, Any]) -> str:
    """``mean [lo, hi]`` of a bootstrap mean, or ``–`` when it has no value."""
    return "–" if s["mean"] is None else f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def diagnostic_main(
    module: str,
    description: str,
    run: Callable[..., dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None = None,
) -> int:
    """``python -m MODULE --encoder CKPT --out OUT [--data D] [--quick] [-q]``.

    Args:
        module: The module's dotted name (the program name and the recorded command).
        description: The ``--help`` description.
        run: ``run(encoder, data_root, quick=..., progress=...)`` returning the payload.
        markdown: The payload's report text.
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        0; a bad checkpoint or encoder exits with status 2 and the error on stderr.
    """
    prog = f"python -m {module}"
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--encoder", default=str(SHIPPED_CHECKPOINT), help="checkpoint folder")
    parser.add_argument("--out", required=True, help="write OUT.json and OUT.md")
    parser.add_argument("--data", default=None, help="data root")
    parser.add_argument("--quick", action="store_true", help="the benchmark's fixed subset")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-query lines")
    args = parser.parse_args(argv)
    try:
        payload = run(args.encoder, args.data, quick=args.quick, progress=not args.quiet)
    except (OmniencError, ValueError) as e:
        parser.exit(2, f"{module.rsplit('.', 1)[-1]}: error: {e}\n")
    words = list(sys.argv[1:] if argv is None else argv)
    payload["command"] = " ".join([prog, *words])
    text = markdown(payload)
    json_path, md_path = write_report(Path(args.out), payload, text)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0
