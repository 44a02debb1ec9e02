"""What every ``omnienc`` subcommand shares: the common flags, declared once, and plain tables.

:func:`add_common_flags` declares ``-q/--quiet``, ``--debug``, ``--data`` and ``--cache-dir``
for a subcommand, each where it means something (a subcommand that reads no data root takes no
``--data``); :func:`add_shard_flag` declares ``--shard K/N``; :func:`add_crop_size_flag` and
:func:`crop_size_from_flag` declare and read few-shot segmentation's ``--crop-size``;
:func:`print_table` prints the aligned text tables the subcommands report with.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DEBUG_HELP = "show tracebacks on errors"


def add_debug_flag(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """Declare ``--debug`` on the top-level parser (``top``) or on a subcommand.

    A subcommand's flag defaults to ``SUPPRESS``: ``omnienc --debug CMD`` sets it before the
    subcommand is parsed, and a subcommand default would reset it.
    """
    default = False if top else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=default, help=DEBUG_HELP)


def add_crop_size_flag(p: argparse.ArgumentParser, help: str) -> None:
    """Declare ``--crop-size N [N N]``: few-shot segmentation's reference crop and windows."""
    p.add_argument("--crop-size", type=int, nargs="+", metavar="N", help=help)


def crop_size_from_flag(values: Sequence[int] | None) -> tuple[int, int, int] | None:
    """``--crop-size``'s values: one int (a cube) or three, all positive; ``None`` if not given.

    Raises:
        ValueError: Another number of values, or one below 1.
    """
    if values is None:
        return None
    if len(values) not in (1, 3) or min(values) < 1:
        raise ValueError(f"--crop-size takes one or three positive ints, got {list(values)}")
    return (values[0],) * 3 if len(values) == 1 else (values[0], values[1], values[2])


def add_common_flags(
    p: argparse.ArgumentParser, *, data: bool = False, cache: str | None = None
) -> None:
    """Declare the flags every subcommand shares, each where it means something.

    Args:
        p: A subcommand's parser.
        data: Also ``--data DIR``, for subcommands that read MedMNIST or volumes from a data
            root.
        cache: Also ``--cache-dir DIR``, for subcommands that keep a cache; what it holds (e.g.
            ``"preprocessing cache"``) starts its help.

    ``-q/--quiet`` (no progress bars) and ``--debug`` go on every subcommand.
    """
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_debug_flag(p)
    if cache is not None:
        p.add_argument("--cache-dir", type=Path, help=f"{cache} (default ~/.cache/omnienc)")
    if data:
        p.add_argument(
            "--data",
            metavar="DIR",
            help="data root with medmnist/ and volumes/ (default: $OMNIENC_DATA, else "
            "../shared/data)",
        )


def add_shard_flag(p: argparse.ArgumentParser, also: str = "") -> None:
    """Declare ``--shard K/N`` (``also`` ends its help: what a shard writes)."""
    from omnienc.shard import shard_arg

    p.add_argument(
        "--shard",
        type=shard_arg,
        metavar="K/N",
        help=f"process only shard K of N (1-based, split by sorted relative path){also}",
    )


def _fmt_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain aligned text table to stdout."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    print(_fmt_row(header, widths))
    print(_fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(_fmt_row(r, widths))


def _fmt_tuple(t: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in t)
