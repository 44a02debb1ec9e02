"""The encoder contract, run on every registered encoder (as timm's test_models.py does)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omnienc.encoders import (
    ENCODERS,
    FAMILIES,
    Encoder,
    arch_name,
    build_encoder,
    encoder_from_config,
)
from omnienc.encoders.vit3d import ViT3DEncoder
from omnienc.lifting import LIFT_DEPTH, lift_2d

NAMES = sorted(ENCODERS)


@pytest.fixture(scope="module", params=NAMES)
def encoder(request: pytest.FixtureRequest) -> Encoder:
    torch.manual_seed(0)
    return build_encoder(request.param)


def _volume(size: int | tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    dims = (size,) * 3 if isinstance(size, int) else size
    return torch.randn(batch, 1, *dims, generator=torch.Generator().manual_seed(seed))


def _check_grid(encoder: Encoder, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
    assert len(feats) == len(encoder.feature_info)
    for f, info in zip(feats, encoder.feature_info, strict=True):
        r = info["reduction"]
        expected = (x.shape[0], info["num_chs"], *(math.ceil(n / r) for n in x.shape[2:]))
        assert tuple(f.shape) == expected, info


def test_contract_attributes(encoder: Encoder) -> None:
    assert encoder.family in FAMILIES
    assert encoder.config.in_chans == 1
    info = encoder.feature_info
    assert info and all(set(i) == {"num_chs", "reduction", "module"} for i in info)
    assert [i["reduction"] for i in info] == sorted(i["reduction"] for i in info)
    assert info[-1]["num_chs"] == encoder.embed_dim
    # The deepest stride is LIFT_DEPTH, so a lifted 2D image keeps one slice at the deepest level.
    assert info[-1]["reduction"] == LIFT_DEPTH
    modules = dict(encoder.named_modules())
    assert all(i["module"] in modules for i in info)
    assert not any(hasattr(encoder, name) for name in ("head", "fc", "classifier"))


def test_shapes_32(encoder: Encoder) -> None:
    x = _volume(32)
    with torch.no_grad():
        feats = encoder.forward_intermediates(x)
        deepest = encoder.forward_features(x)
        emb = encoder(x)
    _check_grid(encoder, x, feats)
    assert deepest.shape == feats[-1].shape
    assert emb.shape == (2, encoder.embed_dim)
    assert emb.dtype == torch.float32


def test_forward_is_global_mean_of_features(encoder: Encoder) -> None:
    encoder.eval()
    x = _volume(32)
    with torch.no_grad():
        deepest = encoder.forward_features(x)
        emb = encoder(x)
    naive = torch.stack([deepest[b].reshape(deepest.shape[1], -1).mean(-1) for b in range(2)])
    torch.testing.assert_close(emb, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [28, (20, 33, 17)])
def test_odd_sizes(encoder: Encoder, size: int | tuple[int, int, int]) -> None:
    x = _volume(size)
    with torch.no_grad():
        feats = encoder.forward_intermediates(x)
        emb = encoder(x)
    _check_grid(encoder, x, feats)
    assert torch.isfinite(emb).all()


def test_lifted_2d(encoder: Encoder) -> None:
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x = lift_2d(images)
    assert x.shape == (2, 1, LIFT_DEPTH, 28, 28)
    with torch.no_grad():
        feats = encoder.forward_intermediates(x)
        emb = encoder(x)
    _check_grid(encoder, x, feats)
    assert feats[-1].shape[2] == 1
    assert emb.shape == (2, encoder.embed_dim) and torch.isfinite(emb).all()


def test_gradients(encoder: Encoder) -> None:
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    encoder(_volume(32)).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in encoder.parameters() if p.grad is not None)
    encoder.zero_grad(set_to_none=True)


def test_eval_determinism(encoder: Encoder) -> None:
    encoder.eval()
    x = _volume(32)
    with torch.inference_mode():
        a, b = encoder(x), encoder(x)
    assert torch.equal(a, b)
    # Samples are encoded independently: a batch of one gives the same embedding.
    with torch.inference_mode():
        single = encoder(x[:1])
    torch.testing.assert_close(single, a[:1], rtol=1e-4, atol=1e-5)


def test_config_round_trip(encoder: Encoder) -> None:
    rebuilt = encoder_from_config(encoder.family, encoder.config.to_dict())
    assert rebuilt.config == encoder.config
    assert arch_name(encoder) in ENCODERS


@pytest.mark.parametrize(
    "shape", [(2, 32, 32, 32), (2, 2, 32, 32, 32), (2, 1, 32, 32), (2, 1, 1, 32, 32, 32)]
)
def test_bad_input_shape(shape: tuple[int, ...]) -> None:
    enc = build_encoder("resconv_tiny")
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\) batch with C=1"):
        enc(torch.zeros(shape))


def test_bad_input_dtype() -> None:
    with pytest.raises(ValueError, match="float tensor"):
        build_encoder("vit3d_tiny")(torch.zeros(1, 1, 32, 32, 32, dtype=torch.long))


def test_resconv_refuses_single_voxel_deepest_grid() -> None:
    with pytest.raises(ValueError, match="1x1x1 grid at stride 16"):
        build_encoder("resconv_tiny")(torch.zeros(2, 1, 16, 16, 16))


def test_in_chans_override() -> None:
    enc = build_encoder("resconv_tiny", in_chans=2)
    assert enc(torch.zeros(1, 2, 32, 32, 32)).shape == (1, enc.embed_dim)
    assert arch_name(enc) == "resconv"


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'resnet9000'; known: resconv_base"):
        build_encoder("resnet9000")


def test_unknown_override() -> None:
    with pytest.raises(ValueError, match=r"unknown ResConvConfig keys \['width'\]"):
        build_encoder("resconv_tiny", width=3)


def test_encoder_from_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown encoder family 'unet'"):
        encoder_from_config("unet", {})
    with pytest.raises(ValueError, match=r"unknown ViT3DConfig keys \['heads'\]"):
        encoder_from_config("vit3d", {"heads": 3})
    with pytest.raises(ValueError, match="must divide embed_dim"):
        encoder_from_config("vit3d", {"embed_dim": 100, "num_heads": 3})


def test_vit_position_embedding_interpolation() -> None:
    torch.manual_seed(0)
    enc = build_encoder("vit3d_tiny", img_size=64)
    assert isinstance(enc, ViT3DEncoder)
    enc.eval()
    # At the native 64^3 grid (4^3 tokens) the learned embedding is used as is.
    assert enc.position_embedding((4, 4, 4)) is enc.pos_embed
    # At 32^3 (2^3 tokens) it is the trilinear resize of the learned one.
    resized = enc.position_embedding((2, 2, 2))
    expected = F.interpolate(enc.pos_embed, size=(2, 2, 2), mode="trilinear", align_corners=False)
    torch.testing.assert_close(resized, expected)
    # Downsampling 4 -> 2 with align_corners=False averages each 2x2x2 block exactly.
    block_mean = F.avg_pool3d(enc.pos_embed, 2)
    torch.testing.assert_close(resized, block_mean)
    with torch.no_grad():
        assert enc(_volume(64, batch=1)).shape == (1, 192)
        assert enc(_volume(32, batch=1)).shape == (1, 192)
    # The position embedding takes part: changing it changes the embedding at both sizes.
    x32, x64 = _volume(32, batch=1), _volume(64, batch=1)
    with torch.no_grad():
        before = enc(x32), enc(x64)
        enc.pos_embed.add_(1.0)
        after = enc(x32), enc(x64)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_vit_pads_high_side_with_zeros() -> None:
    torch.manual_seed(0)
    enc = build_encoder("vit3d_tiny").eval()
    x = _volume(28, batch=1)
    padded = F.pad(x, (0, 4, 0, 4, 0, 4))
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), enc.forward_features(padded))


def test_random_encoders_are_seeded_and_random_like_keeps_the_shape():
    from omnienc.encoders import random_encoder, random_like

    a, b = random_encoder("resconv_tiny", 3), random_encoder("resconv_tiny", 3)
    c = random_encoder("resconv_tiny", 4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    floor = random_like(a, 3)
    assert floor.family == a.family and floor.config == a.config
    assert all(torch.equal(v, sa[k]) for k, v in floor.state_dict().items())


def test_random_spec_parsing() -> None:
    from omnienc.encoders import parse_random_spec

    assert parse_random_spec("random:resconv_small") == ("resconv_small", None)
    assert parse_random_spec("random:resconv_small:3") == ("resconv_small", 3)
    assert parse_random_spec("checkpoints/omnienc-cpu30min") is None
    with pytest.raises(ValueError, match="random:resconv_small:x: the seed"):
        parse_random_spec("random:resconv_small:x")
