"""The language-adapter subcommand ``omnienc describe``: its arguments and its run.

``omnienc align`` is parsed by :func:`omnienc.adapters.language.alignment.main` (jsonargparse, as
``pretrain``), which :func:`omnienc.cli.command.main` calls before argparse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omnienc.cli.common import add_common_flags


def cmd_describe(args: argparse.Namespace) -> int:
    """``omnienc describe CKPT VOLUME --lm PATH [--projector DIR]``: print generated text."""
    from omnienc.adapters.language import describe

    result = describe(
        args.checkpoint, args.volume, args.lm, args.projector, args.max_new_tokens, args.frame
    )
    print(result.text)
    if result.templated:
        print(
            f"omnienc: note: projector {result.projector} was trained on templated text made "
            "from labels, not on radiology reports",
            file=sys.stderr,
        )
    return 0


def describe_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc describe``'s arguments, the common flags among them."""
    p.add_argument("checkpoint", metavar="CKPT", help="encoder folder (or random:ARCH[:SEED])")
    p.add_argument("volume", type=Path, metavar="VOLUME", help="volume file or DICOM folder")
    p.add_argument("--lm", type=Path, required=True, metavar="PATH", help="the aligned LM folder")
    p.add_argument("--projector", type=Path, metavar="DIR", help="projector folder")
    p.add_argument("--max-new-tokens", type=int, help="longest text (default: the projector's)")
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    add_common_flags(p)
    p.set_defaults(func=cmd_describe)
