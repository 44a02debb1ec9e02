"""The shared AdamW + warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from omnienc.optim import adamw_warmup_cosine, decay_groups, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 110, 0.05) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.05) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.05) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert warmup_cosine(110, 10, 110, 0.05) == pytest.approx(0.05)
    assert warmup_cosine(500, 10, 110, 0.0) == pytest.approx(0.0)  # stays at the floor
    assert warmup_cosine(50, 10, None, 0.05) == 1.0  # no schedule length: constant
    assert warmup_cosine(50, 10, 10, 0.05) == 1.0
    assert warmup_cosine(35, 10, 60, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_groups_decay_weights_only_and_skip_frozen():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)
    decay, no_decay = decay_groups(net, lr=0.1, weight_decay=0.05)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 1, 3, 3, 3)]
    assert len(no_decay["params"]) == 4  # conv bias, norm weight and bias, linear bias
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    out = adamw_warmup_cosine([decay, no_decay], 4, 20, 0.0)
    assert out["lr_scheduler"]["interval"] == "step"
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 / 4)  # first warm-up step
