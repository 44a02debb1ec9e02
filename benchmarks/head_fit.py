"""How well a pretrained in-context head fits its own pretext task, by the size of the task.

The method issue's diagnostics found the head's training soft Dice low in every recipe. This
module says where: it draws pretraining pairs exactly as a run does (same config, views and
tasks, from a fixed sample stream that training did not see at these indices), runs the
exported encoder and head on them without gradients, and scores every non-empty task of the
query by soft Dice, hard Dice (``p > 0.5``) and the ratio of predicted to true volume. Each task
is also scored against the *resolution ceiling* of the head: the target average-pooled to the
head's output stride, upsampled trilinearly and thresholded at 0.5, the best a map at that
stride can draw (as sharp as a thresholded, upsampled logit map gets). The table groups the
tasks into quartiles of their size in the query crop. Run::

    python -m omnienc.benchmarks.head_fit --encoder checkpoints/omnienc-cpu30min \\
        --config configs/cpu-30min.yaml [--batches 12] [--seed 7] [--out FILE] [OVERRIDES]

where OVERRIDES are the pretraining run's own (``--data.preprocessing.spacing [4,4,4]`` ...),
so that the pairs are those the head was trained on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from omnienc.benchmarks.report import machine_facts, write_report
from omnienc.checkpoint import load_encoder
from omnienc.encoders.base import Encoder
from omnienc.errors import OmniencError
from omnienc.pretext.data import PretrainDataModule
from omnienc.pretext.incontext import InContextHead
from omnienc.pretext.segment import load_incontext_head
from omnienc.pretext.train import parse_config

EPS = 1e-6


def stride_ceiling(target: torch.Tensor, stride: int) -> torch.Tensor:
    """The best mask a logit map at ``stride`` can draw of ``target``.

    Args:
        target: ``(N, D, H, W)`` masks in [0, 1].
        stride: The map's stride (1 returns the target).

    Returns:
        ``(N, D, H, W)`` float masks: ``target`` average-pooled by ``stride`` (partial cells at
        the border count by their fraction), upsampled trilinearly and thresholded at 0.5.
    """
    if stride == 1:
        return (target >= 0.5).float()
    low = F.avg_pool3d(target[:, None].float(), stride, ceil_mode=True, count_include_pad=False)
    up = F.interpolate(low, scale_factor=stride, mode="trilinear", align_corners=False)
    d, h, w = target.shape[1:]
    return (up[:, 0, :d, :h, :w] >= 0.5).float()


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item Dice of ``(N, ...)`` masks or probabilities."""
    p, y = pred.flatten(1), target.flatten(1)
    return 2 * (p * y).sum(1) / (p.sum(1) + y.sum(1) + EPS)


@torch.no_grad()
def score_tasks(
    encoder: Encoder, head: InContextHead, batches: Iterable[dict[str, torch.Tensor]]
) -> list[dict[str, float]]:
    """Score the head on every non-empty valid task of some pretraining batches.

    Args:
        encoder: The encoder, in eval mode.
        head: Its in-context head, in eval mode.
        batches: Collated pairs with their views (``ref_image``, ``query_image`` ``(B, 1, *S)``,
            ``ref_masks``, ``query_masks`` ``(B, T, *S)``, ``task_valid`` ``(B, T)``).

    Returns:
        One dict per task: ``voxels`` (target size in the query crop), ``soft_dice``, ``dice``
        (at ``p > 0.5``), ``ceiling`` (Dice of :func:`stride_ceiling` at the head's stride)
        and ``volume_ratio`` (predicted / true voxels).
    """
    rows: list[dict[str, float]] = []
    for batch in batches:
        ref, query = batch["ref_image"], batch["query_image"]
        b = ref.shape[0]
        feats = encoder.forward_intermediates(torch.cat([ref, query]))
        logits = head(
            [f[:b] for f in feats],
            batch["ref_masks"],
            [f[b:] for f in feats],
            tuple(query.shape[2:]),
        )
        keep = batch["task_valid"] & (batch["query_masks"].flatten(2).sum(-1) > 0)
        y = batch["query_masks"][keep].float()
        p = torch.sigmoid(logits[keep].float())
        hard = (p > 0.5).float()
        ceiling = stride_ceiling(y, head.fpn_stride)
        sizes = y.flatten(1).sum(1)
        parts = zip(
            sizes.tolist(),
            _dice(p, y).tolist(),
            _dice(hard, y).tolist(),
            _dice(ceiling, y).tolist(),
            (hard.flatten(1).sum(1) / sizes).tolist(),
            strict=True,
        )
        keys = ("voxels", "soft_dice", "dice", "ceiling", "volume_ratio")
        rows += [dict(zip(keys, values, strict=True)) for values in parts]
    return rows


def by_size(rows: Sequence[dict[str, float]], groups: int = 4) -> list[dict[str, Any]]:
    """Mean scores over all tasks and over size quantile groups (median volume ratio).

    Args:
        rows: :func:`score_tasks` output.
        groups: How many equal-count size groups.

    Returns:
        The row ``"all"`` then one per group, each with ``tasks``, ``voxels`` (the group's
        ``[min, max]``) and the means of ``soft_dice``, ``dice``, ``ceiling`` and the median of
        ``volume_ratio``.
    """
    if not rows:
        raise ValueError("no non-empty task to score")
    sizes = np.array([r["voxels"] for r in rows])
    order = np.argsort(sizes, kind="stable")
    chunks = [
        ("all", order),
        *(
            (f"size {i + 1}/{groups}", c)
            for i, c in enumerate(np.array_split(order, groups))
            if len(c)
        ),
    ]
    out = []
    for name, idx in chunks:
        pick = [rows[i] for i in idx]
        mean = {k: float(np.mean([r[k] for r in pick])) for k in ("soft_dice", "dice", "ceiling")}
        out.append(
            {
                "group": name,
                "tasks": len(pick),
                "voxels": [float(sizes[idx].min()), float(sizes[idx].max())],
                **mean,
                "volume_ratio": float(np.median([r["volume_ratio"] for r in pick])),
            }
        )
    return out


def markdown(table: Sequence[dict[str, Any]], encoder: str, stride: int, command: str) -> str:
    """The :func:`by_size` table as Markdown, with the command that made it."""
    lines = [
        f"# Head fit on pretraining pairs: `{encoder}`",
        "",
        f"    {command}",
        "",
        f"Output stride of the head: {stride}; ceiling: the target pooled to that stride, "
        "upsampled, >= 0.5.",
        "",
        "| tasks | size in the query crop (voxels) | n | soft Dice | Dice (p > 0.5) | ceiling | "
        "volume ratio (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lo, hi = r["voxels"]
        lines.append(
            f"| {r['group']} | {lo:.0f}-{hi:.0f} | {r['tasks']} | {r['soft_dice']:.3f} | "
            f"{r['dice']:.3f} | {r['ceiling']:.3f} | {r['volume_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Score a checkpoint's head on pretraining pairs and print (and save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="checkpoint folder with a head")
    parser.add_argument("--config", required=True, help="the pretraining run config (YAML)")
    parser.add_argument("--batches", type=int, default=12, help="batches of pairs to score")
    parser.add_argument("--seed", type=int, default=7, help="seed of the pair stream")
    parser.add_argument("--data", default=None, help="data root")
    parser.add_argument("--out", default=None, help="write FILE.md and FILE.json")
    args, extra = parser.parse_known_args(argv)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    try:
        encoder = load_encoder(args.encoder)[0].eval()
        head, _ = load_incontext_head(args.encoder, encoder)
    except OmniencError as e:
        parser.exit(2, f"head_fit: error: {e}\n")
    torch.manual_seed(args.seed)
    config, _, _ = parse_config(["--config", args.config, "--seed", str(args.seed), *extra])
    module = PretrainDataModule(config.data, data_root=args.data, seed=args.seed)
    module.prepare_data()
    module.setup()
    assert module.dataset is not None
    module.dataset.augment = True  # the views, as pretraining on the CPU draws them
    size = config.data.batch_size
    batches = (
        default_collate([module.dataset[i * size + j] for j in range(size)])
        for i in range(args.batches)
    )
    table = by_size(score_tasks(encoder, head, batches))
    command = "python -m omnienc.benchmarks.head_fit " + " ".join(argv or sys.argv[1:])
    text = markdown(table, args.encoder, head.fpn_stride, command)
    print(text)
    if args.out:
        payload = {
            "encoder": args.encoder,
            "stride": head.fpn_stride,
            "command": command,
            "machine": machine_facts(),
            "groups": table,
        }
        write_report(Path(args.out), payload, text, newline=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
