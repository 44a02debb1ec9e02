"""``--shard K/N``: split a corpus into N disjoint parts for a job array, the same on every host.

Per-volume jobs (``omnienc masks``, ``omnienc embed``) take ``--shard K/N`` and process only
shard ``K`` of ``N``. Shards are numbered from 1 (``K`` in ``1..N``, as SLURM's
``--array=1-N`` numbers its tasks: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``).

The split never depends on the order in which a file system lists a folder: the items are sorted
by a key (for a folder, each volume's path relative to the folder, in POSIX form, then its DICOM
series UID), and shard ``K`` takes the items at sorted positions ``K-1, K-1+N, K-1+2N, ...``
(round-robin, so the shards' sizes differ by at most one and folders of one kind are spread over
all shards). Every host that sees the same files computes the same shards; the N shards are
disjoint and together hold every item exactly once.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based).

    Attributes:
        index: ``K``, in ``1..count``.
        count: ``N``, at least 1.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard {self.index}/{self.count}: N must be at least 1")
        if not 1 <= self.index <= self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: K must be in 1..{self.count} (shards are "
                f"numbered from 1; with a 0-based job array pass $((TASK_ID + 1))/{self.count})"
            )

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """Parse ``"K/N"``.

        Raises:
            ValueError: ``spec`` is not two integers ``K/N`` with ``1 <= K <= N``.
        """
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ValueError(
                f"shard {spec!r} is not K/N with whole numbers, e.g. 1/4 (the first of four)"
            )
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: Sequence[T], key: Callable[[T], str | tuple[str, ...]]) -> list[T]:
        """The items of this shard, in sorted order of ``key``.

        Args:
            items: Everything to split (any order).
            key: A key that is the same on every host, e.g. a path relative to the corpus root.

        Returns:
            ``sorted(items, key=key)[index - 1 :: count]``.
        """
        return sorted(items, key=key)[self.index - 1 :: self.count]

    def output_path(self, path: str | Path) -> Path:
        """``DIR/NAME.shard-K-of-N.SUFFIX``: the per-shard file of an output ``DIR/NAME.SUFFIX``."""
        path = Path(path)
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")


def relative_key(root: Path, path: Path, extra: str | None = None) -> tuple[str, str]:
    """The host-independent sort key of a volume below ``root``: POSIX relative path, series.

    Args:
        root: The corpus folder.
        path: A file (or DICOM folder) below it.
        extra: A further tie-breaker, e.g. the DICOM series UID of several series in a folder.
    """
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return rel, extra or ""


def shard_arg(spec: str) -> Shard:
    """``argparse`` type of ``--shard K/N`` (a parse error names the option and the problem)."""
    try:
        return Shard.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
