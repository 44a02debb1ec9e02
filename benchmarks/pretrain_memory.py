"""Peak memory of a short pretraining run against the size of the corpus.

    python -m omnienc.benchmarks.pretrain_memory --copies 1 4 16 --label "on disk" [--append]

Each case runs ``omnienc pretrain`` (the ``configs/cpu-quick.yaml`` recipe: batch 8, 32^3 crops,
``resconv_small``; ``--steps`` steps, one epoch, no worker processes) in a fresh process and reads
its peak resident set size (:func:`omnienc.benchmarks.robustness.memory.peak_rss`: ``ru_maxrss`` of
the command, started from a small launcher). The ``N``x corpus is ``N`` copies of the real volume
folder (``<data root>/volumes``) in a scratch data root, each under its own subfolder and made of
hard links (or copies where links fail). A copy keeps its files' names and contents, so its cache
keys (content and file name) are those of the original: every copy reuses the original's
preprocessed volumes and mask proposals and no case recomputes them, while the data module still
sees ``N`` times as many volumes. The preprocessing and mask caches are filled first, by a one-step
run on the 1x corpus (not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omnienc.benchmarks.machine import load_average
from omnienc.benchmarks.robustness.interrupts import omnienc_command
from omnienc.benchmarks.robustness.memory import peak_rss
from omnienc.data.root import resolve_data_root

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu-quick.yaml"
TIMEOUT_S = 1800


def link_tree(src: Path, dest: Path) -> None:
    """Mirror the files below ``src`` at ``dest`` as hard links (copies where linking fails)."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)


def make_corpus(volumes: Path, copies: int, root: Path) -> Path:
    """A data root whose ``volumes/`` holds ``copies`` copies of ``volumes`` (``copy00``...)."""
    for i in range(copies):
        link_tree(volumes, root / "volumes" / f"copy{i:02d}")
    return root


def pretrain_command(data_root: Path, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """``omnienc pretrain`` with the cpu-quick recipe for ``steps`` steps (one epoch)."""
    return [
        *omnienc_command(),
        "pretrain",
        "--config",
        str(CONFIG),
        "--data_root",
        str(data_root),
        "--run_dir",
        str(run_dir),
        "--trainer.max_steps",
        str(steps),
        "--data.steps_per_epoch",
        str(steps),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def measure(
    volumes: Path, copies: int, steps: int, scratch: Path, extra: list[str]
) -> dict[str, Any]:
    """Peak RSS and wall time of ``steps`` pretraining steps on the ``copies``x corpus."""
    root = make_corpus(volumes, copies, scratch / f"data{copies}")
    run_dir = scratch / f"run{copies}"
    mb, seconds, code, tail = peak_rss(pretrain_command(root, run_dir, steps, extra), TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"pretraining on the {copies}x corpus failed ({code}):\n{tail}")
    n_volumes = sum(1 for _ in (root / "volumes").rglob("*") if _.is_file())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "copies": copies,
        "files": n_volumes,
        "steps": steps,
        "peak_rss_mb": round(mb),
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": round(load_average(), 2),
    }


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown page of benchmark rows (each with its command and date)."""
    commands = list(dict.fromkeys(r["command"] for r in rows))
    return [
        "# Peak RSS of pretraining against the corpus size",
        "",
        *(f"Command: `{c}`  " for c in commands),
        f"Machine: {platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        "the 1-minute load average at the end of each run is in the JSON file.",
        "",
        "| code | corpus | files | steps | peak RSS (MB) | wall s | date |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(
            f"| {r['label']} | {r['copies']}x | {r['files']} | {r['steps']} | "
            f"{r['peak_rss_mb']} | {r['seconds']} | {r['date']} |"
            for r in rows
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark; writes JSON and Markdown."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", type=Path, default=None, help="data root (default: the usual one)")
    p.add_argument("--label", default="", help="a name for this code version in the table")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_memory"))
    p.add_argument(
        "--append", action="store_true", help="keep the rows already in OUT.json (other code)"
    )
    p.add_argument("extra", nargs="*", help="more omnienc pretrain arguments (after --)")
    args = p.parse_args(argv)
    volumes = resolve_data_root(args.data) / "volumes"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="omnienc-pretrain-memory-") as tmp:
        scratch = Path(tmp)
        warm = pretrain_command(volumes.parent, scratch / "warm", 1, args.extra)
        _, _, code, tail = peak_rss(warm, TIMEOUT_S)  # fills the caches, not measured
        if code != 0:
            raise RuntimeError(f"the cache-filling run failed ({code}):\n{tail}")
        rows = [measure(volumes, n, args.steps, scratch, args.extra) for n in args.copies]
    command = "python -m omnienc.benchmarks.pretrain_memory " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    for r in rows:
        r["label"] = args.label
        r["command"] = command
    previous = args.out.with_suffix(".json")
    if args.append and previous.is_file():
        rows = json.loads(previous.read_text())["rows"] + rows
    lines = format_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
