"""The contrastive objective: lightly's heads and losses on the two crops' embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnienc.pretext.contrastive import ContrastiveConfig, ContrastiveObjective


def _naive_ntxent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent written out: each of the 2B views against the 2B - 1 others."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n = a.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[j] / temperature for j in range(2 * n) if j != i])
        others = [j for j in range(2 * n) if j != i]
        total = total - (sims[others.index(positive)] - torch.logsumexp(sims, 0))
    return total / (2 * n)


def test_config_validation_and_round_trip():
    cfg = ContrastiveConfig(kind="vicreg", hidden_dim=32, proj_dim=16)
    assert ContrastiveConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ContrastiveConfig.from_dict({"kind": "ntxent", "tau": 0.1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "byol"},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"hidden_dim": 0},
        {"proj_dim": 0},
    ],
)
def test_config_rejects(kwargs):
    with pytest.raises(ValueError):
        ContrastiveConfig(**kwargs)


def test_ntxent_matches_naive_reference():
    objective = ContrastiveObjective(8, ContrastiveConfig(kind="ntxent", temperature=0.3))
    objective.head = nn.Identity()  # bypass the head: the loss alone
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    torch.testing.assert_close(
        objective(a, b).double(), _naive_ntxent(a, b, 0.3), rtol=1e-5, atol=1e-6
    )


def test_ntxent_analytic_value():
    """Identical views of two orthogonal embeddings: each view has one positive at similarity 1
    and two negatives at 0, so the loss is log(1 + 2 exp(-1 / t))."""
    t = 0.2
    objective = ContrastiveObjective(4, ContrastiveConfig(kind="ntxent", temperature=t))
    objective.head = nn.Identity()
    z = torch.eye(4)[:2]
    assert math.isclose(
        objective(z, z.clone()).item(), math.log(1 + 2 * math.exp(-1 / t)), rel_tol=1e-5
    )


def test_ntxent_with_known_head_matches_naive_reference():
    objective = ContrastiveObjective(6, ContrastiveConfig(kind="ntxent", hidden_dim=12, proj_dim=5))
    objective.train()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss = objective(a, b)
    head = objective.head  # train-mode BatchNorm: each view normalised with its own batch
    expected = _naive_ntxent(head(a), head(b), objective.config.temperature)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ntxent", "vicreg"])
def test_gradients_reach_the_head_and_the_inputs(kind):
    objective = ContrastiveObjective(16, ContrastiveConfig(kind=kind, hidden_dim=32, proj_dim=8))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    b = torch.randn(4, 16, generator=g, requires_grad=True)
    loss = objective(a, b)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in objective.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_vicreg_matches_lightly_on_the_projections():
    from lightly.loss import VICRegLoss

    objective = ContrastiveObjective(8, ContrastiveConfig(kind="vicreg", hidden_dim=16, proj_dim=8))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    torch.testing.assert_close(
        objective(a, b), VICRegLoss()(objective.head(a), objective.head(b)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["ntxent", "vicreg"])
def test_batch_of_one_is_an_error(kind):
    objective = ContrastiveObjective(8, ContrastiveConfig(kind=kind))
    with pytest.raises(ValueError, match="at least 2 samples"):
        objective(torch.randn(1, 8), torch.randn(1, 8))


def test_shape_mismatch_is_an_error():
    objective = ContrastiveObjective(8)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        objective(torch.randn(3, 8), torch.randn(3, 7))


def test_loss_is_float32_under_bf16_autocast():
    objective = ContrastiveObjective(8, ContrastiveConfig(hidden_dim=16, proj_dim=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(torch.randn(4, 8), torch.randn(4, 8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
