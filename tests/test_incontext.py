"""MASS's in-context pretext: pair sampling, views, the head and the Dice + BCE loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from omnienc.encoders import Encoder, build_encoder
from omnienc.pretext.augment import PARAM_KEYS, augment_sample, draw_view_params
from omnienc.pretext.fusion import sinusoidal_position_encoding_3d
from omnienc.pretext.incontext import (
    HeadConfig,
    InContextHead,
    build_incontext_head,
    incontext_loss,
)
from omnienc.pretext.pairs import PairConfig, sample_pair

TINY_HEAD = HeadConfig(dim=16, num_learned_tokens=2, depth=2, num_heads=2, mlp_ratio=1.0)
ENCODERS = {
    "resconv_tiny": {},
    "vit3d_tiny": {"img_size": 32, "embed_dim": 48, "depth": 4, "num_heads": 2},
}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder(request: pytest.FixtureRequest) -> Encoder:
    torch.manual_seed(0)
    return build_encoder(request.param, **ENCODERS[request.param])


def _volume(shape: tuple[int, int, int], n_masks: int, seed: int = 0):
    """An image whose voxels are all distinct and ``n_masks`` random box masks."""
    rng = np.random.default_rng(seed)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    masks = np.zeros((n_masks, *shape), dtype=bool)
    for m in masks:
        lo = [rng.integers(0, max(n - 8, 1)) for n in shape]
        hi = [lo_ + rng.integers(4, 16) for lo_ in lo]
        m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return image, masks


def _crop(array: np.ndarray, origin: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    (o0, o1, o2), (s0, s1, s2) = origin, size
    return array[:, o0 : o0 + s0, o1 : o1 + s1, o2 : o2 + s2]


def _overlap(a: np.ndarray, b: np.ndarray, size: tuple[int, ...]) -> float:
    shared = np.clip(np.asarray(size) - np.abs(a - b), 0, None)
    return float(np.prod(shared) / np.prod(size))


# --- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PairConfig, HeadConfig])
def test_config_round_trip_and_unknown_key(cls):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_size": (32, 32)},
        {"crop_size": (32, 0, 32)},
        {"min_overlap": 0.0},
        {"min_overlap": 1.5},
        {"max_tasks": -1},
        {"absent_tasks": -1},
        {"min_task_voxels": 0},
        {"max_tasks": 0, "whole_crop_task": False},
    ],
)
def test_pair_config_rejects(kwargs):
    with pytest.raises(ValueError):
        PairConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 10, "num_heads": 4},
        {"depth": 0},
        {"token_scales": 0},
        {"num_learned_tokens": -1},
        {"output_stride": 0},
        {"decoder": "unet"},
    ],
)
def test_head_config_rejects(kwargs):
    with pytest.raises(ValueError):
        HeadConfig(**kwargs)


# --- pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("min_overlap", [0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(70, 50, 40), (33, 90, 32), (20, 40, 10)])
def test_overlap_guarantee_over_many_seeds(shape, min_overlap):
    cfg = PairConfig(crop_size=(32, 32, 32), min_overlap=min_overlap, max_tasks=0)
    image = np.zeros((1, *shape), dtype=np.float32)
    masks = np.zeros((0, *shape), dtype=bool)
    padded = np.maximum(shape, 32)
    for seed in range(150):
        pair = sample_pair(image, masks, cfg, np.random.default_rng(seed))
        for key in ("ref_origin", "query_origin"):
            assert (pair[key] >= 0).all() and (pair[key] + 32 <= padded).all()
        assert _overlap(pair["ref_origin"], pair["query_origin"], cfg.crop_size) >= min_overlap
        assert pair["query_masks"][0].mean() >= min_overlap - 1e-9


def test_pairs_vary_and_are_reproducible():
    image, masks = _volume((80, 80, 80), 6)
    cfg = PairConfig(crop_size=(32, 32, 32), max_tasks=3, min_task_voxels=8)
    a = sample_pair(image, masks, cfg, np.random.default_rng(3))
    b = sample_pair(image, masks, cfg, np.random.default_rng(3))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    origins = {
        tuple(sample_pair(image, masks, cfg, np.random.default_rng(s))["ref_origin"])
        for s in range(20)
    }
    assert len(origins) > 10


def test_masks_and_crops_are_aligned():
    shape = (60, 52, 44)
    image, masks = _volume(shape, 12, seed=1)
    cfg = PairConfig(crop_size=(32, 24, 40), max_tasks=4, min_task_voxels=10)
    size = cfg.crop_size
    for seed in range(20):
        pair = sample_pair(image, masks, cfg, np.random.default_rng(seed))
        r, q = pair["ref_origin"], pair["query_origin"]
        assert np.array_equal(pair["ref_image"], _crop(image, r, size))
        assert np.array_equal(pair["query_image"], _crop(image, q, size))
        valid = pair["task_valid"]
        assert valid[0] and pair["ref_masks"][0].min() == 1.0
        # Task 0's target: query voxels whose volume coordinate lies inside the reference crop.
        grid = (
            np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"))
            + q[:, None, None, None]
        )
        inside = np.all(
            (grid >= r[:, None, None, None]) & (grid < (r + size)[:, None, None, None]), axis=0
        )
        assert np.array_equal(pair["query_masks"][0], inside.astype(np.float32))
        ref_crops, query_crops = _crop(masks, r, size), _crop(masks, q, size)
        for t in np.flatnonzero(valid)[1:]:
            # Each task is one proposal, cropped at both origins, with enough voxels in each.
            (m,) = [
                i
                for i in range(len(masks))
                if np.array_equal(ref_crops[i], pair["ref_masks"][t] > 0)
                and np.array_equal(query_crops[i], pair["query_masks"][t] > 0)
            ][:1]
            assert ref_crops[m].sum() >= 10 and query_crops[m].sum() >= 10
        assert not pair["ref_masks"][~valid].any() and not pair["query_masks"][~valid].any()
        assert valid.sum() == 1 + min(
            4, int(((ref_crops.sum((1, 2, 3)) >= 10) & (query_crops.sum((1, 2, 3)) >= 10)).sum())
        )


def test_absent_tasks_are_in_the_reference_and_not_in_the_query():
    shape = (64, 64, 64)
    image, masks = _volume(shape, 40, seed=2)
    cfg = PairConfig(crop_size=(32, 32, 32), max_tasks=2, min_task_voxels=8, absent_tasks=3)
    assert cfg.num_tasks == 6
    seen = 0
    for seed in range(30):
        pair = sample_pair(image, masks, cfg, np.random.default_rng(seed))
        r, q = pair["ref_origin"], pair["query_origin"]
        ref_crops, query_crops = _crop(masks, r, cfg.crop_size), _crop(masks, q, cfg.crop_size)
        absent = (ref_crops.sum((1, 2, 3)) >= 8) & (query_crops.sum((1, 2, 3)) == 0)
        slots = pair["task_valid"][3:]
        assert slots.sum() == min(3, int(absent.sum()))
        for t in 3 + np.flatnonzero(slots):
            assert not pair["query_masks"][t].any()
            # The reference mask is one of the absent proposals, cropped to the reference.
            assert any(
                np.array_equal(ref_crops[i], pair["ref_masks"][t] > 0)
                for i in np.flatnonzero(absent)
            )
        seen += int(slots.sum())
        # The present tasks are drawn exactly as without absent slots.
        plain = sample_pair(
            image, masks, dataclasses.replace(cfg, absent_tasks=0), np.random.default_rng(seed)
        )
        for key in ("ref_masks", "query_masks", "task_valid"):
            assert np.array_equal(pair[key][:3], plain[key])
    assert seen > 0


def test_small_volume_is_padded_with_its_minimum():
    image = np.full((1, 20, 40, 10), 5.0, dtype=np.float32)
    image[0, 3, 4, 5] = -2.0
    masks = np.ones((1, 20, 40, 10), dtype=bool)
    pair = sample_pair(
        image,
        masks,
        PairConfig(crop_size=(32, 32, 32), min_task_voxels=1),
        np.random.default_rng(0),
    )
    assert pair["ref_image"].shape == (1, 32, 32, 32)
    assert list(pair["pad_low"]) == [6, 0, 11]
    padded_img = np.pad(image, [(0, 0), (6, 6), (0, 0), (11, 11)], constant_values=-2.0)
    padded_mask = np.pad(masks, [(0, 0), (6, 6), (0, 0), (11, 11)])
    o = pair["ref_origin"]
    assert o[0] == 0 and o[2] == 0
    np.testing.assert_array_equal(pair["ref_image"], padded_img[:, :, o[1] : o[1] + 32])
    np.testing.assert_array_equal(pair["ref_masks"][1], padded_mask[0, :, o[1] : o[1] + 32])
    assert pair["ref_image"].min() == -2.0


@pytest.mark.parametrize("whole_crop_task", [True, False])
def test_no_masks(whole_crop_task):
    image = np.zeros((1, 40, 40, 40), dtype=np.float32)
    cfg = PairConfig(crop_size=(32, 32, 32), max_tasks=3, whole_crop_task=whole_crop_task)
    pair = sample_pair(image, np.zeros((0, 40, 40, 40), bool), cfg, np.random.default_rng(0))
    assert pair["ref_masks"].shape == (cfg.num_tasks, 32, 32, 32)
    assert pair["ref_masks"].dtype == np.float32 and pair["task_valid"].dtype == bool
    assert pair["task_valid"].tolist() == [True] * whole_crop_task + [False] * 3


def test_task_picking_prefers_variety():
    shape = (40, 40, 40)
    image = np.zeros((1, *shape), dtype=np.float32)
    masks = np.zeros((3, *shape), dtype=bool)
    masks[0, :, :, :20] = True
    masks[1, :, :, :21] = True  # nearly the same structure as mask 0
    masks[2, :, :, 20:] = True
    cfg = PairConfig(crop_size=(40, 40, 40), max_tasks=2, whole_crop_task=False)
    for seed in range(10):
        pair = sample_pair(image, masks, cfg, np.random.default_rng(seed))
        picked = {
            int(np.flatnonzero([np.array_equal(m, pair["ref_masks"][t] > 0) for m in masks])[0])
            for t in range(2)
        }
        assert 2 in picked and len(picked) == 2


def test_sample_pair_rejects_bad_shapes():
    with pytest.raises(ValueError, match="masks"):
        sample_pair(
            np.zeros((1, 8, 8, 8), np.float32),
            np.zeros((1, 8, 8, 9), bool),
            PairConfig(),
            np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match="image"):
        sample_pair(
            np.zeros((8, 8, 8), np.float32),
            np.zeros((1, 8, 8, 8), bool),
            PairConfig(),
            np.random.default_rng(0),
        )


# --- views ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> dict[str, np.ndarray]:
    image, masks = _volume((64, 64, 64), 10, seed=2)
    image = image / image.max()
    cfg = PairConfig(crop_size=(32, 32, 32), max_tasks=3, min_task_voxels=8)
    return sample_pair(image, masks, cfg, np.random.default_rng(0))


def _views(pair: dict[str, np.ndarray], seed: int, **fixed: object) -> dict[str, np.ndarray]:
    """The views of ``pair`` drawn from ``seed`` (some parameters forced), as numpy arrays."""
    params = draw_view_params(np.random.default_rng(seed), pair["query_image"].shape[1:])
    params.update({k: np.asarray(v) for k, v in fixed.items()})
    sample = {k: torch.from_numpy(np.asarray(v)) for k, v in {**pair, **params}.items()}
    return {k: v.numpy() for k, v in augment_sample(sample).items()}


def test_augment_is_reproducible(pair):
    a, b = _views(pair, 7), _views(pair, 7)
    assert set(a) == set(pair)  # no parameter keys left
    assert not set(a) & set(PARAM_KEYS)
    for k in a:
        assert a[k].shape == pair[k].shape and a[k].dtype == pair[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k])
    outs = [_views(pair, s)["query_image"] for s in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])
    np.testing.assert_array_equal(a["ref_masks"], pair["ref_masks"])  # weak view: no geometry


def test_query_view_moves_image_and_masks_together(pair):
    marked = dict(pair)
    marked["query_image"] = pair["query_masks"][:1].copy()
    spatial_only = {
        "aug_scale": 1.0,
        "aug_shift": 0.0,
        "aug_gamma": 1.0,
        "aug_noise_std": 0.0,
        "aug_sigma": np.zeros(3, np.float32),
    }
    turned = 0
    for seed in range(8):
        out = _views(marked, seed, **spatial_only)
        np.testing.assert_array_equal(out["query_image"][0], out["query_masks"][0])
        assert out["query_masks"].sum() == pair["query_masks"].sum()
        turned += not np.array_equal(out["query_masks"], pair["query_masks"])
    assert turned > 0


def test_query_view_keeps_non_cubic_shape():
    rng = np.random.default_rng(0)
    sample = {
        "ref_image": rng.random((1, 32, 16, 24), dtype=np.float32),
        "query_image": rng.random((1, 32, 16, 24), dtype=np.float32),
        "ref_masks": np.zeros((3, 32, 16, 24), np.float32),
        "query_masks": np.zeros((3, 32, 16, 24), np.float32),
        "task_valid": np.ones(3, bool),
    }
    for seed in range(5):
        params = draw_view_params(np.random.default_rng(seed), (32, 16, 24))
        assert int(params["aug_rot90"]) == 0  # no rotation of a non-square axial plane
        out = _views(sample, seed)
        assert out["query_masks"].shape == (3, 32, 16, 24)


# --- head ----------------------------------------------------------------------------------


def _batch(b: int, t: int, size: tuple[int, int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(b, 1, *size, generator=g)
    query = torch.randn(b, 1, *size, generator=g)
    masks = (torch.rand(b, t, *size, generator=g) > 0.7).float()
    target = (torch.rand(b, t, *size, generator=g) > 0.7).float()
    return ref, query, masks, target


@pytest.mark.parametrize("size", [(32, 32, 32), (40, 24, 32)])
@pytest.mark.parametrize("t", [1, 3])
def test_head_shapes(encoder: Encoder, size, t):
    head = InContextHead(encoder.feature_info, TINY_HEAD)
    ref, query, masks, _ = _batch(2, t, size)
    with torch.no_grad():
        logits = head(
            encoder.forward_intermediates(ref), masks, encoder.forward_intermediates(query), size
        )
    assert logits.shape == (2, t, *size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_head_strides(encoder: Encoder):
    head = InContextHead(encoder.feature_info, TINY_HEAD)
    expected = 4 if encoder.family == "resconv" else 16
    assert head.fpn_stride == expected
    assert (
        head.token_levels
        == head.fuse_levels
        == [len(encoder.feature_info) - 2, len(encoder.feature_info) - 1]
    )


def test_conv_decoder_starts_as_the_dot_product_and_learns(encoder: Encoder):
    """The per-task refinement starts at zero (a new head is the plain dot product) and trains."""
    torch.manual_seed(0)
    dot = InContextHead(encoder.feature_info, TINY_HEAD)
    conv = InContextHead(
        encoder.feature_info, HeadConfig(**{**TINY_HEAD.to_dict(), "decoder": "conv"})
    )
    missing, unexpected = conv.load_state_dict(dot.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("task_decoder.") for k in missing)
    size = (32, 32, 32)
    ref, query, masks, target = _batch(2, 3, size)
    ref_feats = encoder.forward_intermediates(ref)
    query_feats = encoder.forward_intermediates(query)
    with torch.no_grad():
        assert torch.allclose(
            conv(ref_feats, masks, query_feats, size), dot(ref_feats, masks, query_feats, size)
        )
    logits = conv([f.detach() for f in ref_feats], masks, [f.detach() for f in query_feats], size)
    incontext_loss(logits, target, torch.ones(2, 3, dtype=torch.bool))["loss"].backward()
    assert conv.task_decoder is not None
    last = conv.task_decoder.net[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    # Tasks stay independent: a task's logits do not depend on the other tasks in the batch.
    with torch.no_grad():
        one = conv(ref_feats, masks[:, :1], query_feats, size)
        assert torch.allclose(one, conv(ref_feats, masks, query_feats, size)[:, :1], atol=1e-5)


@pytest.mark.parametrize("output_stride", [1, 2, 3])
def test_head_output_stride(encoder: Encoder, output_stride):
    """A finer output stride takes the FPN down to the finest scale at or above it."""
    config = HeadConfig(**{**TINY_HEAD.to_dict(), "output_stride": output_stride})
    head = InContextHead(encoder.feature_info, config)
    strides = [int(i["reduction"]) for i in encoder.feature_info]
    assert head.fpn_stride == min((r for r in strides if r >= output_stride), default=max(strides))
    if encoder.family == "resconv":
        assert head.fpn_stride == (2 if output_stride <= 2 else 4)
    size = (32, 32, 32)
    ref, query, masks, _ = _batch(2, 2, size)
    with torch.no_grad():
        logits = head(
            encoder.forward_intermediates(ref), masks, encoder.forward_intermediates(query), size
        )
    assert logits.shape == (2, 2, *size) and torch.isfinite(logits).all()


def test_gradients_reach_head_and_encoder(encoder: Encoder):
    torch.manual_seed(0)
    head = build_incontext_head(encoder.feature_info, TINY_HEAD.to_dict())
    ref, query, masks, target = _batch(2, 3, (32, 32, 32))
    masks[1, 2] = 0.0  # an empty (padding) task
    valid = torch.tensor([[True, True, False], [True, False, True]])
    encoder.zero_grad()
    logits = head(
        encoder.forward_intermediates(ref),
        masks,
        encoder.forward_intermediates(query),
        (32, 32, 32),
    )
    incontext_loss(logits, target, valid)["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # The last intermediate is final-normed for every family: no encoder parameter is unused.
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tasks_are_independent(encoder: Encoder):
    """A task's logits do not depend on the other (or padding) tasks beside it."""
    head = InContextHead(encoder.feature_info, TINY_HEAD).eval()
    ref, query, masks, _ = _batch(1, 3, (32, 32, 32), seed=4)
    masks[0, 2] = 0.0
    with torch.no_grad():
        rf, qf = encoder.forward_intermediates(ref), encoder.forward_intermediates(query)
        all_tasks = head(rf, masks, qf, (32, 32, 32))
        one = head(rf, masks[:, :1], qf, (32, 32, 32))
    torch.testing.assert_close(all_tasks[:, :1], one, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(all_tasks).all()


def test_empty_mask_pools_to_zero_without_nan():
    head = InContextHead(
        [{"num_chs": 4, "reduction": 2}, {"num_chs": 8, "reduction": 4}], TINY_HEAD
    )
    feats = [torch.randn(1, 4, 8, 8, 8), torch.randn(1, 8, 4, 4, 4)]
    tokens = head.task_tokens(feats, torch.zeros(1, 2, 16, 16, 16))
    assert tokens.shape == (1, 2, 4, 16) and torch.isfinite(tokens).all()
    # With the pooled features zero, the token is the LayerNorm bias plus the level embedding.
    expected = head.token_norm.bias + head.token_level_embed[0]
    torch.testing.assert_close(tokens[0, 0, 0], expected)


def test_masked_pooling_matches_naive_average():
    head = InContextHead(
        [{"num_chs": 3, "reduction": 4}],
        HeadConfig(dim=8, num_heads=2, token_scales=1, fuse_scales=1),
    )
    feat = torch.randn(1, 3, 4, 4, 4)
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[0, 0, :4, :4, :8] = 1.0  # exactly grid cells (0, 0, 0) and (0, 0, 1)
    projected = head.token_proj[0](feat)
    naive = projected[0, :, 0, 0, :2].mean(-1)
    expected = head.token_norm(naive) + head.token_level_embed[0]
    torch.testing.assert_close(head.task_tokens([feat], mask)[0, 0, 0], expected)


def test_too_many_scales_is_an_error():
    with pytest.raises(ValueError, match="fuse_scales"):
        InContextHead([{"num_chs": 4, "reduction": 16}], HeadConfig(token_scales=1, fuse_scales=2))


def test_position_encoding():
    pe = sinusoidal_position_encoding_3d((2, 3, 4), stride=8, dim=16)
    assert pe.shape == (24, 16) and torch.isfinite(pe).all()
    # Row 0 is the voxel-centre coordinate 3.5 on each axis: sin at frequency 1 first.
    assert math.isclose(float(pe[0, 0]), math.sin(3.5), rel_tol=1e-5)
    assert len({tuple(r.tolist()) for r in pe}) == 24


# --- loss ----------------------------------------------------------------------------------


def _naive_loss(logits, target, valid):
    """Dice over valid non-empty targets, BCE over all valid tasks, in float64 loops."""
    dices, bces = [], []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not valid[b, t]:
                continue
            x, y = logits[b, t].double().flatten(), target[b, t].double().flatten()
            p = 1.0 / (1.0 + torch.exp(-x))
            if y.sum() > 0:
                dices.append((2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5))
            bces.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
    bce = torch.stack(bces).mean()
    if not dices:
        return bce, torch.zeros((), dtype=torch.float64), bce
    dice = torch.stack(dices).mean()
    return 1 - dice + bce, dice, bce


def test_loss_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 5, 4, generator=g) * 2
    target = (torch.rand(3, 4, 6, 5, 4, generator=g) > 0.6).float()
    valid = torch.rand(3, 4, generator=g) > 0.4
    valid[0, 0] = True
    out = incontext_loss(logits, target, valid)
    loss, dice, bce = _naive_loss(logits, target, valid)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dice"].double(), dice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["bce"].double(), bce, rtol=1e-5, atol=1e-6)
    assert out["num_valid"] == valid.sum() and not out["dice"].requires_grad


def test_loss_with_empty_targets_matches_naive_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, 5, 4, generator=g) * 2
    target = (torch.rand(2, 5, 6, 5, 4, generator=g) > 0.6).float()
    target[:, 3:] = 0.0  # absent structures: empty query targets
    valid = torch.ones(2, 5, dtype=torch.bool)
    out = incontext_loss(logits, target, valid)
    loss, dice, bce = _naive_loss(logits, target, valid)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dice"].double(), dice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["bce"].double(), bce, rtol=1e-5, atol=1e-6)


def test_an_empty_target_is_learned_by_bce_alone():
    # Only absent tasks: no Dice term; predicting "nothing here" drives the loss to 0.
    target = torch.zeros(1, 2, 8, 8, 8)
    valid = torch.ones(1, 2, dtype=torch.bool)
    silent = incontext_loss(torch.full_like(target, -30.0), target, valid)
    assert silent["loss"] < 1e-6 and silent["dice"] == 0
    firing = incontext_loss(torch.full_like(target, 3.0), target, valid)
    torch.testing.assert_close(firing["loss"], firing["bce"])
    assert firing["loss"] > 3.0


def test_loss_analytic_cases():
    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, :4] = 1.0
    target[0, 1, 4:] = 1.0
    valid = torch.ones(1, 2, dtype=torch.bool)
    perfect = incontext_loss((target * 2 - 1) * 30, target, valid)
    assert perfect["dice"] > 1 - 1e-6 and perfect["loss"] < 1e-6
    disjoint = incontext_loss((1 - target * 2) * 30, target, valid)
    assert disjoint["dice"] < 1e-6 and disjoint["loss"] - disjoint["bce"] > 1 - 1e-6
    # Invalid tasks count nowhere: a wrong invalid task leaves the loss unchanged.
    half = incontext_loss(
        torch.stack([(target[:, 0] * 2 - 1) * 30, -target[:, 1] * 30], 1),
        target,
        torch.tensor([[True, False]]),
    )
    assert half["loss"] < 1e-6


def test_loss_without_valid_tasks_is_zero_with_a_graph():
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    out = incontext_loss(logits, torch.ones(2, 3, 4, 4, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_loss_is_float32_under_bf16_autocast():
    logits = torch.randn(1, 2, 4, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = incontext_loss(logits, torch.ones(1, 2, 4, 4, 4), torch.ones(1, 2, dtype=torch.bool))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        incontext_loss(
            torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), torch.ones(1, 2, dtype=torch.bool)
        )
