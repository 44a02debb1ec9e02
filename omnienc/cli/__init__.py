"""The ``omnienc`` command line, one module per subcommand group.

* :mod:`~omnienc.cli.command`: the top-level parser, the dispatch and one-line errors
  (:func:`main`, :func:`build_parser`);
* :mod:`~omnienc.cli.common`: the flags every subcommand shares (``-q/--quiet``, ``--debug``,
  ``--data``, ``--cache-dir``), declared once, and plain text tables;
* :mod:`~omnienc.cli.info`: ``omnienc info``;
* :mod:`~omnienc.cli.features`: ``omnienc embed``, ``probe`` and ``umap``;
* :mod:`~omnienc.cli.bench`: ``omnienc bench``;
* :mod:`~omnienc.cli.pretext`: ``omnienc pretrain``, ``masks`` and ``segment``;
* :mod:`~omnienc.cli.publish`: ``omnienc export``;
* :mod:`~omnienc.cli.language`: ``omnienc align`` and ``describe``.

Every subcommand imports what it runs when it runs, so ``omnienc --help`` stays fast.
"""

from omnienc.cli.command import build_parser, main
from omnienc.cli.common import add_common_flags, add_debug_flag, add_shard_flag, print_table

__all__ = [
    "add_common_flags",
    "add_debug_flag",
    "add_shard_flag",
    "build_parser",
    "main",
    "print_table",
]
