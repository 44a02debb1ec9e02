"""The optimiser every trained part of omnienc uses: AdamW, linear warm-up, cosine decay.

Pretraining (:mod:`omnienc.pretext.module`), end-to-end classification
(:mod:`omnienc.adapters.classification.finetune`) and the segmentation decoder
(:mod:`omnienc.adapters.segmentation`) all step a ``LambdaLR`` per optimizer step with
:func:`warmup_cosine`, over parameter groups from :func:`decay_groups`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then cosine decay to ``min_ratio``.

    Args:
        step: Optimizer steps taken so far.
        warmup_steps: Steps of the linear warm-up from ``1 / warmup_steps`` to 1.
        total_steps: Step at which the decay reaches ``min_ratio`` (it stays there afterwards);
            ``None``, or not beyond the warm-up, keeps the factor at 1 after the warm-up.
        min_ratio: Final factor.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of a module's trainable parameters: weights decay, biases and norms do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def adamw_warmup_cosine(
    groups: list[dict[str, Any]], warmup_steps: int, total_steps: int | None, min_ratio: float
) -> dict[str, Any]:
    """AdamW over ``groups`` with a per-step :func:`warmup_cosine` schedule, as Lightning's
    ``configure_optimizers`` returns it."""
    optimizer = torch.optim.AdamW(groups)
    factor = functools.partial(
        warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
