"""The query view's random affine map (``ViewConfig.affine``): drawn, applied, off by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnienc.pretext.augment import ViewConfig, augment_sample, draw_view_params

SIZE = (24, 24, 24)
ON = ViewConfig(affine=(1.0, 30.0, 0.3, 0.1))


def _sample(seed: int, config: ViewConfig | None = None, **fixed: object):
    """A pair whose query image is its first task mask, and its drawn view parameters."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((2, *SIZE), np.float32)
    masks[0, 6:16, 8:20, 4:14] = 1.0
    masks[1, 2:6, 2:6, 2:6] = 1.0
    pair = {
        "ref_image": rng.random((1, *SIZE), dtype=np.float32),
        "query_image": masks[:1].copy(),
        "ref_masks": masks.copy(),
        "query_masks": masks.copy(),
        "task_valid": np.ones(2, bool),
    }
    params = draw_view_params(np.random.default_rng(seed), SIZE, config)
    params.update({k: np.asarray(v) for k, v in fixed.items()})
    return {k: torch.from_numpy(np.asarray(v)) for k, v in {**pair, **params}.items()}


def test_the_affine_draws_leave_every_other_parameter_as_it_was():
    for seed in range(5):
        off = draw_view_params(np.random.default_rng(seed), SIZE)
        on = draw_view_params(np.random.default_rng(seed), SIZE, ON)
        np.testing.assert_array_equal(off["aug_affine"], np.eye(3, dtype=np.float32))
        assert not np.allclose(on["aug_affine"], np.eye(3))
        for k in off.keys() - {"aug_affine"}:
            np.testing.assert_array_equal(off[k], on[k], err_msg=k)


def test_the_affine_is_a_rotation_scale_and_shear_within_its_ranges():
    m = draw_view_params(np.random.default_rng(3), SIZE, ViewConfig(affine=(1.0, 30.0, 0, 0)))
    a = m["aug_affine"].astype(np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-6)  # a pure rotation
    assert np.linalg.det(a) == pytest.approx(1.0, abs=1e-6)
    assert np.degrees(np.arccos((np.trace(a) - 1) / 2)) <= 3 * 30.0
    scaled = draw_view_params(np.random.default_rng(3), SIZE, ViewConfig(affine=(1.0, 0, 0.3, 0)))
    d = np.diag(scaled["aug_affine"])
    assert np.all(np.abs(d - 1) <= 0.3) and np.count_nonzero(scaled["aug_affine"] - np.diag(d)) == 0


def test_image_and_masks_move_together_and_masks_stay_binary():
    spatial_only = {"aug_flip": np.zeros(3, bool), "aug_rot90": 0, "aug_scale": 1.0}
    spatial_only |= {"aug_shift": 0.0, "aug_gamma": 1.0, "aug_noise_std": 0.0}
    spatial_only |= {"aug_sigma": np.zeros(3, np.float32)}
    moved = 0
    for seed in range(6):
        out = augment_sample(_sample(seed, ON, **spatial_only))
        image, masks = out["query_image"][0], out["query_masks"]
        assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
        # The image is the first mask resampled trilinearly; the mask is it cut at 0.5.
        assert torch.equal(image > 0.5, masks[0] > 0)
        assert abs(float(masks[0].sum()) - 1200) < 0.5 * 1200  # about the same volume
        moved += not torch.equal(masks, _sample(seed)["query_masks"])
    assert moved == 6


def test_an_identity_affine_changes_nothing():
    identity = augment_sample(_sample(1, aug_affine=np.eye(3, dtype=np.float32)))
    off = augment_sample(_sample(1))
    for k in identity:
        torch.testing.assert_close(identity[k], off[k], rtol=0, atol=0)


def test_the_affine_is_checked():
    with pytest.raises(ValueError, match="affine takes 4 finite numbers"):
        ViewConfig(affine=(1.0, 30.0, 0.3))
    with pytest.raises(ValueError, match="affine: the ranges must be >= 0"):
        ViewConfig(affine=(0.5, 30.0, -0.3, 0.1))
    assert ViewConfig().affine[0] == 0.0  # off by default: the default views are unchanged
