"""``omnienc export``: a checkpoint as a folder to publish (weights, config.json, model card)."""

from __future__ import annotations

import argparse
from pathlib import Path

from omnienc.cli.common import add_common_flags


def cmd_export(args: argparse.Namespace) -> int:
    """``omnienc export CKPT OUT``: weights + config.json + model card, ready to publish."""
    from omnienc.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint, args.out, license=args.license, results=args.results, repo_id=args.repo_id
    )
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc export``'s arguments, the common flags among them."""
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or hf-hub:ORG/NAME[@REV]")
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write")
    p.add_argument("--license", default="other", help="license id for the card (default: other)")
    p.add_argument(
        "--results",
        nargs="+",
        type=Path,
        default=[],
        metavar="JSON",
        help="results files written by `omnienc bench` (benchmarks/results/bench/*.json)",
    )
    p.add_argument("--repo-id", metavar="ORG/NAME", help="Hub id it will be published under")
    add_common_flags(p)
    p.set_defaults(func=cmd_export)
