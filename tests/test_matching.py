"""The parameter-free prototype-matching loss (PANet's, on the encoder's own features)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omnienc.encoders import build_encoder
from omnienc.io import read_volume
from omnienc.pretext.matching import MatchingConfig, prototype_matching_loss
from omnienc.pretext.module import ModelConfig, PretrainModule


@pytest.fixture(scope="module")
def pair(volumes: Path) -> dict[str, torch.Tensor]:
    """Two overlapping 32^3 crops of the real CT and their liver and right-kidney masks.

    Returns ``ref_image``/``query_image`` ``(1, 1, 32, 32, 32)`` in [0, 1] and
    ``ref_masks``/``query_masks`` ``(1, 2, 32, 32, 32)``, as a pretraining batch of one pair.
    """
    ct = read_volume(volumes / "totalsegmentator/example_ct_sm.nii.gz").array
    seg = read_volume(volumes / "totalsegmentator/example_seg.nii.gz").array
    x = (torch.from_numpy(ct).float().clamp(-200, 300) + 200) / 500  # (122, 101, 30)
    labels = torch.from_numpy(seg).long()
    masks = torch.stack([labels == 5, labels == 2]).float()  # liver, right kidney
    # Both organs lie around x = 81; z (30 slices) is padded to 40: the image by edge
    # replication, the masks with zeros (the padded slices are outside every label).
    x = F.pad(x[None, None], (5, 5, 0, 0, 0, 0), mode="replicate")[0]
    masks = F.pad(masks[None], (5, 5, 0, 0, 0, 0))[0]
    cx, cy = 81, 46
    ref = (slice(cx - 16, cx + 16), slice(cy - 16, cy + 16), slice(4, 36))
    query = (slice(cx - 12, cx + 20), slice(cy - 14, cy + 18), slice(6, 38))
    return {
        "ref_image": x[(slice(None), *ref)][None],
        "query_image": x[(slice(None), *query)][None],
        "ref_masks": masks[(slice(None), *ref)][None],
        "query_masks": masks[(slice(None), *query)][None],
        "task_valid": torch.ones(1, 2, dtype=torch.bool),
    }


def _mask_features(masks: torch.Tensor, grids: tuple[int, ...]) -> list[torch.Tensor]:
    """Features that *are* the masks (one channel per task plus a constant), per grid size."""
    out = []
    for g in grids:
        m = F.adaptive_avg_pool3d(masks, (g, g, g))
        out.append(torch.cat([m, torch.ones_like(m[:, :1])], dim=1))
    return out


def test_config_is_checked():
    assert MatchingConfig().scales == 0 and MatchingConfig().scale == 20.0
    with pytest.raises(ValueError, match="scales"):
        MatchingConfig(scales=-1)
    with pytest.raises(ValueError, match="scale must be > 0"):
        MatchingConfig(scale=0)


def test_features_that_are_the_masks_match_and_constant_features_do_not(pair):
    assert pair["ref_masks"].sum(dim=(2, 3, 4)).min() > 100  # both organs in both crops
    assert pair["query_masks"].sum(dim=(2, 3, 4)).min() > 100
    grids = (16, 8)
    ref = _mask_features(pair["ref_masks"], grids)
    query = _mask_features(pair["query_masks"], grids)
    args = (pair["ref_masks"], query, pair["query_masks"], pair["task_valid"])
    perfect = prototype_matching_loss(ref, *args)
    flat = [torch.ones(1, 3, g, g, g) for g in grids]  # every prototype is the same vector
    blind = prototype_matching_loss(flat, pair["ref_masks"], flat, *args[2:])
    # Equal similarity to both prototypes: probability 1/2 everywhere, BCE = log 2.
    assert torch.isclose(blind["loss"], torch.tensor(0.6931), atol=1e-3)
    # Cells on an organ's border have soft targets, so even these features keep some loss.
    assert perfect["loss"] < 0.25 * blind["loss"] and perfect["dice"] > 0.8
    # Swapping the query's targets (liver for kidney) makes the perfect features wrong.
    swapped = pair["query_masks"].flip(1)
    wrong = prototype_matching_loss(ref, pair["ref_masks"], query, swapped, pair["task_valid"])
    assert wrong["loss"] > 1.0 and wrong["dice"] < 0.1


def test_padding_and_crop_filling_tasks_count_nowhere(pair):
    grids = (16, 8)
    ref = _mask_features(pair["ref_masks"], grids)
    query = _mask_features(pair["query_masks"], grids)
    base = prototype_matching_loss(
        ref, pair["ref_masks"], query, pair["query_masks"], pair["task_valid"]
    )
    full = torch.ones_like(pair["ref_masks"][:, :1])  # no background: no prototype
    ref_masks = torch.cat([pair["ref_masks"], full, 1 - full], dim=1)
    query_masks = torch.cat([pair["query_masks"], full, full], dim=1)
    valid = torch.ones(1, 4, dtype=torch.bool)
    with_extra = prototype_matching_loss(ref, ref_masks, query, query_masks, valid)
    assert torch.isclose(with_extra["loss"], base["loss"], atol=1e-6)
    valid[0, 1] = False  # the kidney as padding: only the liver counts
    liver = prototype_matching_loss(ref, ref_masks, query, query_masks, valid)
    alone = prototype_matching_loss(
        ref,
        pair["ref_masks"][:, :1],
        query,
        pair["query_masks"][:, :1],
        pair["task_valid"][:, :1],
    )
    assert torch.isclose(liver["loss"], alone["loss"], atol=1e-6)
    none = prototype_matching_loss(ref, full, query, full, torch.ones(1, 1, dtype=torch.bool))
    assert none["loss"] == 0


def test_scales_picks_the_deepest_maps(pair):
    grids = (16, 8)
    good = _mask_features(pair["query_masks"], grids)
    blind = [torch.ones(1, 3, g, g, g) for g in grids]
    ref = _mask_features(pair["ref_masks"], grids)
    args = (pair["ref_masks"],)
    rest = (pair["query_masks"], pair["task_valid"])
    mixed = [blind[0], good[1]]  # the finest map is blind, the deepest matches
    deepest = prototype_matching_loss(
        [ref[0], ref[1]], *args, mixed, *rest, MatchingConfig(scales=1)
    )
    both = prototype_matching_loss([ref[0], ref[1]], *args, mixed, *rest, MatchingConfig())
    assert deepest["loss"] < 0.5 * both["loss"]
    with pytest.raises(ValueError, match="exceeds the encoder's 2 scales"):
        prototype_matching_loss(ref, *args, good, *rest, MatchingConfig(scales=3))
    with pytest.raises(ValueError, match="must have one shape"):
        prototype_matching_loss(ref, *args, [good[1], good[1]], *rest)
    with pytest.raises(ValueError, match="one query map per reference map"):
        prototype_matching_loss(ref, *args, good[:1], *rest)
    with pytest.raises(ValueError, match="must be"):
        prototype_matching_loss(ref, *args, good, pair["query_masks"][:, :1], rest[1])


def test_training_on_the_loss_alone_teaches_a_real_encoder_to_match(pair):
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    optim = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    x = torch.cat([pair["ref_image"], pair["query_image"]])
    losses = []
    for _ in range(25):
        feats = encoder.forward_intermediates(x)
        out = prototype_matching_loss(
            [f[:1] for f in feats],
            pair["ref_masks"],
            [f[1:] for f in feats],
            pair["query_masks"],
            pair["task_valid"],
        )
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_the_mass_recipe_adds_the_weighted_loss(pair):
    config = ModelConfig(encoder="resconv_tiny", matching_weight=0.5)
    assert config.method == "incontext+ntxent+matching"
    module = PretrainModule(config, (32, 32, 32), seed=0)
    batch = {k: torch.cat([v, v.flip(-1) if v.ndim == 5 else v]) for k, v in pair.items()}
    out = module.forward_pair(batch)
    parts = out["incontext"] + out["contrastive"] + 0.5 * out["matching"]
    assert torch.isclose(out["loss"].detach(), parts, rtol=1e-5)
    assert 0 <= out["matching_dice"] <= 1
    out["loss"].backward()
    assert all(p.grad is not None for p in module.encoder.parameters() if p.requires_grad)
    # The loss alone trains every encoder parameter, with padding and crop-filling tasks in
    # the batch (as real batches have), and its gradients are finite.
    alone_module = PretrainModule(
        ModelConfig(
            encoder="resconv_tiny", incontext_weight=0, contrastive_weight=0, matching_weight=1
        ),
        (32, 32, 32),
    )
    padded = dict(batch)
    full = torch.ones_like(batch["ref_masks"][:, :1])
    padded["ref_masks"] = torch.cat([batch["ref_masks"], full, 0 * full], dim=1)
    padded["query_masks"] = torch.cat([batch["query_masks"], full, 0 * full], dim=1)
    padded["task_valid"] = torch.cat(
        [
            batch["task_valid"],
            torch.ones(2, 1, dtype=torch.bool),
            torch.zeros(2, 1, dtype=torch.bool),
        ],
        dim=1,
    )
    only = alone_module.forward_pair(padded)
    assert set(only) == {"loss", "matching", "matching_dice"}
    only["loss"].backward()
    grads = [p.grad for p in alone_module.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    plain = PretrainModule(ModelConfig(encoder="resconv_tiny"), (32, 32, 32))
    assert "matching" not in plain.forward_pair(batch)
    with pytest.raises(ValueError, match=r"set model\.recipe to mass"):
        ModelConfig(recipe="monai_ssl", matching_weight=1)
    with pytest.raises(ValueError, match=">= 0"):
        ModelConfig(matching_weight=-1)
    alone = ModelConfig(incontext_weight=0, contrastive_weight=0, matching_weight=1)
    assert alone.method == "matching"
