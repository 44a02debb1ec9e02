"""Shared report writing: the ``OUT.json`` + ``OUT.md`` pair every benchmark leaves, its heading.

Every benchmark writes its numbers as JSON and its tables as Markdown side by side under
``benchmarks/results/`` (:func:`write_report`), each headed by the command that made them
(:func:`command_line` for ``omnienc bench`` jobs) and the machine it ran on
(:func:`machine_facts`).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from omnienc.atomic import write_bytes_atomic
from omnienc.benchmarks.machine import cpu_model


def write_report(
    out: Path,
    payload: Any,
    markdown: str,
    *,
    newline: bool = False,
    allow_nan: bool = True,
) -> tuple[Path, Path]:
    """Write ``OUT.json`` (``payload``, indented) and ``OUT.md`` atomically; return both paths.

    Args:
        out: The results path without suffix (its folder is made).
        payload: What the JSON file holds.
        markdown: What the Markdown file holds.
        newline: End the JSON file with a newline.
        allow_nan: Let ``NaN``/``Infinity`` into the JSON (``False``: such a value is an error).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, allow_nan=allow_nan) + ("\n" if newline else "")
    json_path = write_bytes_atomic(out.with_suffix(".json"), text.encode())
    return json_path, write_bytes_atomic(out.with_suffix(".md"), markdown.encode())


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user typed it, for the results file."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "omnienc " + " ".join(args)


def machine_facts() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    return {
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
