"""The peer baseline (MONAI's inpainting + rotation + contrastive recipe) on real crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnienc.encoders import build_encoder
from omnienc.io import read_volume
from omnienc.pretext.module import ModelConfig, PretrainModule
from omnienc.pretext.monai_ssl import (
    InpaintingObjective,
    MonaiSSLConfig,
    MonaiSSLObjective,
    _split_stride,
    turn_axial,
)


@pytest.fixture(scope="module")
def crops(volumes: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping 32^3 crops of the real CT, intensities scaled to [0, 1]: ``(2, 1, 32^3)``."""
    data = read_volume(volumes / "totalsegmentator/example_ct_sm.nii.gz").array
    x = torch.from_numpy(data).float().clamp(-200, 300)
    x = (x + 200) / 500  # (122, 101, 30): pad z to 40 by edge replication
    x = torch.nn.functional.pad(x[None, None], (5, 5, 0, 0, 0, 0), mode="replicate")[0, 0]
    c = [s // 2 for s in x.shape]
    a = x[c[0] - 16 : c[0] + 16, c[1] - 16 : c[1] + 16, c[2] - 16 : c[2] + 16]
    b = x[c[0] - 12 : c[0] + 20, c[1] - 16 : c[1] + 16, c[2] - 20 : c[2] + 12]
    ref = torch.stack([a, b])[:, None]
    query = torch.stack([b, a])[:, None]
    return ref, query


@pytest.mark.parametrize(
    "stride, expected", [(16, (4, 4)), (32, (8, 4)), (8, (4, 2)), (4, (2, 2)), (2, (2, 1))]
)
def test_decoder_upsampling_splits_the_stride_as_vitautoenc(stride, expected):
    assert _split_stride(stride) == expected


@pytest.mark.parametrize(
    "name, overrides",
    [("resconv_tiny", {}), ("vit3d_tiny", {"img_size": 32, "patch_size": 8})],
)
def test_losses_are_finite_and_train_every_part(name, overrides, crops):
    ref, query = crops
    encoder = build_encoder(name, **overrides)
    objective = MonaiSSLObjective(encoder, (32, 32, 32), MonaiSSLConfig())
    out = objective(encoder, ref, query, seed=0)
    assert set(out) == {"loss", "inpaint", "rotation", "rotation_acc", "contrastive"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for part in (encoder, objective.decoder, objective.rotation_head, objective.projection):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_same_seed_repeats_the_step_and_another_seed_does_not(crops):
    ref, query = crops
    encoder = build_encoder("resconv_tiny").eval()
    objective = MonaiSSLObjective(encoder, (32, 32, 32), MonaiSSLConfig())
    a = objective(encoder, ref, query, seed=7)["loss"]
    b = objective(encoder, ref, query, seed=7)["loss"]
    c = objective(encoder, ref, query, seed=8)["loss"]
    assert float(a) == float(b)
    assert float(a) != float(c)


def test_corruption_changes_a_copy_only(crops):
    ref, _ = crops
    objective = MonaiSSLObjective(build_encoder("resconv_tiny"), (32, 32, 32), MonaiSSLConfig())
    before = ref.clone()
    out = objective.corrupt(ref, seed=3)
    assert torch.equal(ref, before)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    changed = (out != ref).float().mean()
    assert 0.001 < float(changed) < 1.0


def test_rotation_needs_a_square_axial_plane():
    with pytest.raises(ValueError, match="equal x and y"):
        MonaiSSLObjective(build_encoder("resconv_tiny"), (32, 48, 32), MonaiSSLConfig())


def test_config_refuses_no_loss_and_bad_values():
    with pytest.raises(ValueError, match="not all 0"):
        MonaiSSLConfig(inpaint_weight=0, rotation_weight=0, contrastive_weight=0)
    with pytest.raises(ValueError, match="temperature"):
        MonaiSSLConfig(temperature=0)
    with pytest.raises(ValueError, match="shuffle_prob"):
        MonaiSSLConfig(shuffle_prob=1.5)
    assert MonaiSSLConfig.from_dict(MonaiSSLConfig(holes=3).to_dict()).holes == 3


def test_inpainting_alone_reconstructs_from_corrupted_views_and_trains_encoder_and_decoder(crops):
    ref, _ = crops
    encoder = build_encoder("resconv_tiny")
    objective = InpaintingObjective(encoder, (32, 32, 32), MonaiSSLConfig())
    loss = objective.inpainting_loss(encoder, ref, seed=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for part in (encoder, objective.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # The loss is L1 against the clean views: a decoder that outputs the views scores 0.
    with torch.no_grad():
        feats = encoder.forward_features(objective.corrupt(ref, seed=0))
        recon = objective.reconstruct(feats, ref.shape[2:])
    assert recon.shape == ref.shape
    assert torch.isclose(loss, (recon - ref).abs().mean(), atol=1e-6)
    # No rotation, so a non-square axial plane is fine (unlike the MONAI recipe).
    InpaintingObjective(encoder, (32, 48, 32), MonaiSSLConfig())


def test_mass_recipe_with_inpainting_adds_the_loss_and_only_its_decoder():
    base = ModelConfig(encoder="resconv_tiny")
    mixed = ModelConfig(encoder="resconv_tiny", inpaint_weight=0.5)
    assert base.method == "incontext+ntxent" and mixed.method == "incontext+ntxent+inpaint"
    assert PretrainModule(base, (32, 32, 32)).inpainting is None
    module = PretrainModule(mixed, (32, 32, 32))
    assert isinstance(module.inpainting, InpaintingObjective)
    assert not hasattr(module.inpainting, "rotation_head")  # nothing DDP would find unused
    b, t = 2, 5
    batch = {
        "ref_image": torch.rand(b, 1, 32, 32, 32),
        "query_image": torch.rand(b, 1, 32, 32, 32),
        "ref_masks": torch.ones(b, t, 32, 32, 32),
        "query_masks": torch.ones(b, t, 32, 32, 32),
        "task_valid": torch.ones(b, t, dtype=torch.bool),
    }
    out = module.forward_pair(batch)
    parts = out["incontext"] + out["contrastive"] + 0.5 * out["inpaint"]
    assert torch.isclose(out["loss"].detach(), parts, rtol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in module.inpainting.parameters())
    # Inpainting alone is a valid MASS-recipe objective; nothing at all is not.
    alone = ModelConfig(incontext_weight=0, contrastive_weight=0, inpaint_weight=1)
    assert alone.method == "inpaint"
    with pytest.raises(ValueError, match="switched off"):
        ModelConfig(incontext_weight=0, contrastive_weight=0)
    with pytest.raises(ValueError, match=">= 0"):
        ModelConfig(inpaint_weight=-1)


def test_turn_axial_turns_each_item_in_the_xy_plane():
    x = torch.arange(2 * 1 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 4, 3)
    turns = torch.tensor([1, 3])
    out = turn_axial(x, turns)
    for i in range(2):
        assert torch.equal(out[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))
    assert torch.equal(turn_axial(out, 4 - turns), x)  # a full turn is the identity
    assert torch.equal(
        out[:, :, :, :, 1],
        torch.stack(
            [torch.rot90(x[0, :, :, :, 1], 1, (1, 2)), torch.rot90(x[1, :, :, :, 1], 3, (1, 2))]
        ),
    )


def _pair_batch(b: int = 2, t: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(b, t, 32, 32, 32, generator=g) > 0.7).float()
    return {
        "ref_image": torch.rand(b, 1, 32, 32, 32, generator=g),
        "query_image": torch.rand(b, 1, 32, 32, 32, generator=g),
        "ref_masks": masks,
        "query_masks": masks.flip(2),
        "task_valid": torch.ones(b, t, dtype=torch.bool),
    }


def test_mass_recipe_with_rotation_turns_each_pair_with_its_masks():
    config = ModelConfig(encoder="resconv_tiny", rotation_weight=0.5)
    assert config.method == "incontext+ntxent+rotation"
    module = PretrainModule(config, (32, 32, 32), seed=3)
    assert module.rotation_head is not None
    batch = _pair_batch()
    before = {k: v.clone() for k, v in batch.items()}
    out = module.forward_pair(batch)
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the batch is not changed
    parts = out["incontext"] + out["contrastive"] + 0.5 * out["rotation"]
    assert torch.isclose(out["loss"].detach(), parts, rtol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in module.rotation_head.parameters())
    # The in-context part equals the unrotated module's on the same pairs turned by hand.
    turns = torch.randint(
        0, 4, (2,), generator=torch.Generator().manual_seed(3 * 1_000_003 * 1_009 + 2)
    )
    plain = PretrainModule(ModelConfig(encoder="resconv_tiny"), (32, 32, 32), seed=3)
    plain.load_state_dict(module.state_dict(), strict=False)
    turned = {k: turn_axial(v, turns) if v.ndim == 5 else v for k, v in before.items()}
    with torch.no_grad():
        ref = plain.forward_pair(turned)
    assert torch.isclose(out["incontext"], ref["incontext"], rtol=1e-5)
    with pytest.raises(ValueError, match="equal x and y"):
        PretrainModule(config, (32, 48, 32))


def test_mass_recipe_with_the_whole_peer_objective_adds_its_loss():
    config = ModelConfig(encoder="resconv_tiny", monai_ssl_weight=0.5)
    assert config.method == "incontext+ntxent+monai_ssl(inpaint+rotation+contrastive)"
    module = PretrainModule(config, (32, 32, 32), seed=1)
    assert isinstance(module.monai_ssl, MonaiSSLObjective) and module.head is not None
    assert module.inpainting is None and module.rotation_head is None
    batch = _pair_batch()
    out = module.forward_pair(batch)
    peer = out["monai_ssl_loss"]
    parts = out["incontext"] + out["contrastive"] + 0.5 * peer
    assert torch.isclose(out["loss"].detach(), parts, rtol=1e-5)
    # The peer's part is the peer recipe's loss on the same pair, step and seed.
    alone = PretrainModule(ModelConfig(encoder="resconv_tiny", recipe="monai_ssl"), (32, 32, 32), 1)
    alone.load_state_dict(module.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.isclose(peer, alone.forward_pair(batch)["loss"], rtol=1e-5)
    out["loss"].backward()
    for part in (module.monai_ssl.rotation_head, module.monai_ssl.projection, module.head):
        assert all(p.grad is not None for p in part.parameters())
    export = module.export_meta()
    assert export["model"]["monai_ssl_weight"] == 0.5 and export["incontext_head"] is not None
    with pytest.raises(ValueError, match="already includes the inpainting"):
        ModelConfig(inpaint_weight=1, monai_ssl_weight=1)
    with pytest.raises(ValueError, match=">= 0"):
        ModelConfig(monai_ssl_weight=-1)
