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
from omnienc.benchmarks.fewshot_report import bootstrap_mean, cell_order, cells_of
from omnienc.benchmarks.report import write_report
from omnienc.errors import OmniencError


def refuse_random_init(encoder_spec: str) -> None:
    """A diagnostic of the pretrained head refuses a ``random:`` spec (it has no head).

    Raises:
        ValueError: ``encoder_spec`` is a random-init encoder.
    """
    if encoder_spec.startswith("random:"):
        raise ValueError(f"{encoder_spec}: a random-init encoder has no in-context head")


def rows_by_cell(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each cell (:func:`~.fewshot_report.cells_of`), cells in table order."""
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for cell in cells_of(row):
            members.setdefault(cell, []).append(row)
    return {c: members[c] for c in cell_order() if c in members}


def paired_differences(
    by_cell: dict[str, list[dict[str, Any]]], pairs: Sequence[tuple[str, str]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cell, ``"a - b"``: the bootstrap mean of the rows' Dice differences (same queries)."""
    return {
        cell: {
            f"{a} - {b}": bootstrap_mean([r["dice"][a] - r["dice"][b] for r in rows])
            for a, b in pairs
        }
        for cell, rows in by_cell.items()
    }


def paired_table(paired: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The Markdown lines of :func:`paired_differences`' table (with its heading line)."""
    names = list(next(iter(paired.values()), {}))
    lines = ["", "Paired differences (same queries), mean [95% interval]:", ""]
    lines += ["| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cell, diffs in paired.items():
        lines.append(f"| {cell} | " + " | ".join(interval_text(diffs[n]) for n in diffs) + " |")
    return lines


def variant_table(cells: dict[str, dict[str, Any]], variants: Sequence[str]) -> list[str]:
    """The Markdown lines of a summary's Dice per cell and variant (queries: the first's ``n``).

    Args:
        cells: ``payload["summary"]["cells"]``: per cell, each variant's bootstrap mean.
        variants: The columns, in order.
    """
    lines = ["| cell | queries | " + " | ".join(variants) + " |"]
    lines.append("|---|---:|" + "---|" * len(variants))
    for cell, stats in cells.items():
        texts = " | ".join(interval_text(stats[v]) for v in variants)
        lines.append(f"| {cell} | {stats[variants[0]]['n']} | {texts} |")
    return lines


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
