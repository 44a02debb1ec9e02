"""Mask proposals (omnienc.pretext.masks) on small real volumes, and their on-disk cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from omnienc.data.folder import VolumeFolder
from omnienc.data.labeled import LabeledVolumes
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.masks import (
    MASK_PROVIDERS,
    MaskConfig,
    body_mask,
    compute_folder_masks,
    format_mask_summary,
    load_masks,
    mask_cache_path,
    propose_masks,
    save_masks,
)
from omnienc.pretext.masks import folder as pm

MR_IMAGE = "totalsegmentator/example_mr_sm.nii.gz"  # (117, 91, 20) at 3 mm
CT_IMAGE = "totalsegmentator/example_ct_sm.nii.gz"  # (122, 101, 30) at 3 mm
CT_LABEL = "totalsegmentator/example_seg.nii.gz"
NATIVE = Preprocessing(spacing=None)  # keep the 3 mm grid: small and fast


def _pairwise_iou(masks: np.ndarray) -> np.ndarray:
    flat = masks.reshape(len(masks), -1).astype(np.float64)
    inter = flat @ flat.T
    sizes = flat.sum(axis=1)
    return inter / (sizes[:, None] + sizes[None, :] - inter)


@pytest.fixture(scope="module")
def mr_image(volumes: Path) -> np.ndarray:
    """The preprocessed MR example on its native 3 mm grid, ``(X, Y, Z)`` float32."""
    ds = LabeledVolumes(
        [(volumes / MR_IMAGE, volumes / "totalsegmentator/example_seg_mr.nii.gz")], NATIVE
    )
    return ds[0]["image"].numpy()[0]


@pytest.fixture(scope="module")
def mr_masks(mr_image: np.ndarray) -> np.ndarray:
    return propose_masks(mr_image, MaskConfig())


def test_masks_are_boolean_capped_deduplicated_and_inside_the_body(mr_image, mr_masks):
    config = MaskConfig()
    masks = mr_masks
    assert masks.dtype == bool and masks.ndim == 4 and masks.shape[1:] == mr_image.shape
    assert 10 <= len(masks) <= config.max_masks
    sizes = masks.reshape(len(masks), -1).sum(axis=1)
    body = body_mask(mr_image)
    assert sizes.min() >= config.min_voxels
    assert sizes.max() <= config.max_body_fraction * body.sum()
    inside = (masks & body).reshape(len(masks), -1).sum(axis=1) / sizes
    assert inside.min() >= config.min_inside_body
    iou = _pairwise_iou(masks)
    np.fill_diagonal(iou, 0.0)
    assert iou.max() < config.dedup_iou


def test_proposals_are_deterministic(mr_image, mr_masks):
    again = propose_masks(mr_image.copy(), MaskConfig())
    assert np.array_equal(again, mr_masks)


def test_body_mask_covers_the_body_not_the_air(mr_image):
    body = body_mask(mr_image)
    assert body.dtype == bool and body.shape == mr_image.shape
    assert 0.3 < body.mean() < 0.95
    assert not body[0, 0, :].any()  # a corner of the field of view is air


@pytest.mark.parametrize("name", sorted(set(MASK_PROVIDERS) - {"sam2"}))  # sam2: needs weights
def test_every_provider_returns_valid_masks(name, mr_image):
    config = MaskConfig(providers=(name,))
    body = body_mask(mr_image)
    raw = MASK_PROVIDERS[name](mr_image, body, config)
    assert 0 < len(raw) <= config.max_masks
    for mask in raw:
        assert mask.dtype == bool and mask.shape == mr_image.shape and mask.any()
    masks = propose_masks(mr_image, config)
    assert 0 < len(masks) <= config.max_masks and masks.dtype == bool


def test_liver_and_a_kidney_are_found_on_ct(volumes: Path):
    ds = LabeledVolumes([(volumes / CT_IMAGE, volumes / CT_LABEL)], NATIVE)
    image, label = ds[0]["image"].numpy()[0], ds[0]["label"].numpy()[0]
    masks = propose_masks(image, MaskConfig())

    def best(structure: int) -> float:
        target = label == structure
        inter = (masks & target).reshape(len(masks), -1).sum(axis=1)
        union = masks.reshape(len(masks), -1).sum(axis=1) + target.sum() - inter
        return float((inter / union).max())

    # Measured on this 3 mm grid: liver 0.46, spleen 0.71, left kidney 0.76.
    assert best(5) > 0.4  # TotalSegmentator 5 = liver, 38,634 voxels here
    assert max(best(1), best(3)) > 0.65  # spleen / left kidney


def test_constant_and_too_thin_images_give_no_masks():
    for image in (np.full((20, 24, 16), 3.0, np.float32), np.ones((30, 30, 3), np.float32)):
        masks = propose_masks(image)
        assert masks.shape == (0, *image.shape) and masks.dtype == bool


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="shape"):
        propose_masks(np.zeros((8, 8), np.float32))
    image = np.zeros((8, 8, 8), np.float32)
    image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        propose_masks(image)


def test_a_sam_style_provider_plugs_into_the_dict(monkeypatch, mr_image):
    def box_provider(image, body, config):  # same signature as every provider
        box = np.zeros(image.shape, dtype=bool)
        box[30:60, 30:60, 5:15] = True
        return [box, box.copy()]  # the duplicate must be dropped

    monkeypatch.setitem(MASK_PROVIDERS, "box", box_provider)
    masks = propose_masks(mr_image, MaskConfig(providers=("box",), mask_opening_radius=0))
    assert len(masks) == 1 and masks[0].sum() == 30 * 30 * 10


def test_config_round_trip_and_errors():
    config = MaskConfig(providers=("merge", "otsu"), merge_regions=(24, 48), max_masks=32)
    assert MaskConfig.from_dict(config.to_dict()) == config
    assert config.digest() != MaskConfig().digest()
    with pytest.raises(ValueError, match="unknown mask config keys"):
        MaskConfig.from_dict({"max_mask": 10})
    with pytest.raises(ValueError, match="unknown mask providers"):
        MaskConfig(providers=("sam9",))
    with pytest.raises(ValueError, match="dedup_iou"):
        MaskConfig(dedup_iou=1.5)
    with pytest.raises(ValueError, match="merge_regions"):
        MaskConfig(merge_regions=(0,))


def test_packbits_round_trip_is_exact(tmp_path: Path):
    rng = np.random.default_rng(0)
    masks = rng.random((5, 7, 9, 11)) > 0.5  # 693 voxels: not a multiple of 8
    path = save_masks(tmp_path / "m.npz", masks, MaskConfig())
    back = load_masks(path)
    assert back.dtype == bool and np.array_equal(back, masks)
    empty = save_masks(tmp_path / "e.npz", np.zeros((0, 4, 5, 6), bool), MaskConfig())
    assert load_masks(empty).shape == (0, 4, 5, 6)
    with pytest.raises(DataError, match="no such"):
        load_masks(tmp_path / "missing.npz")


@pytest.fixture
def folder(copy_real, tmp_path: Path) -> VolumeFolder:
    copy_real(MR_IMAGE, dest=tmp_path / "data")
    return VolumeFolder(tmp_path / "data", NATIVE, cache_dir=tmp_path / "cache", progress=False)


def test_cache_is_written_then_served(folder: VolumeFolder, tmp_path: Path, monkeypatch):
    cache = tmp_path / "masks"
    config = MaskConfig()
    (first,) = compute_folder_masks(folder, config, cache, progress=False)
    assert not first.cached and first.n_masks > 0
    assert first.source == folder.entries[0].source
    assert Path(first.cache_file) == mask_cache_path(folder.entries[0], config, cache)
    assert Path(folder.entries[0].cache_file).stem in Path(first.cache_file).name
    expected = propose_masks(folder[0]["image"].numpy()[0], config)
    assert np.array_equal(load_masks(first.cache_file), expected)

    def boom(*args, **kwargs):
        raise AssertionError("propose_masks called although the cache holds the masks")

    monkeypatch.setattr(pm, "propose_masks", boom)
    (second,) = compute_folder_masks(folder, config, cache, progress=False)
    assert second.cached and second.n_masks == first.n_masks
    assert not list(cache.glob(".*.tmp*"))
    summary = format_mask_summary([first, second])
    assert first.source in summary and "2 volumes" in summary and "1 from cache" in summary


def test_corrupt_cache_entry_is_regenerated_with_a_warning(folder, tmp_path, caplog):
    cache = tmp_path / "masks"
    (first,) = compute_folder_masks(folder, MaskConfig(), cache, progress=False)
    good = load_masks(first.cache_file)
    Path(first.cache_file).write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="omnienc"):
        (again,) = compute_folder_masks(folder, MaskConfig(), cache, progress=False)
    assert not again.cached
    assert any(first.cache_file in r.getMessage() for r in caplog.records)
    assert np.array_equal(load_masks(again.cache_file), good)
    assert not list(cache.glob(".*.tmp*"))


def test_parallel_workers_equal_one_worker(folder, copy_real, tmp_path: Path):
    copy_real(CT_IMAGE, dest=tmp_path / "data")
    both = VolumeFolder(tmp_path / "data", NATIVE, cache_dir=tmp_path / "cache", progress=False)
    assert len(both) == 2
    one = compute_folder_masks(both, MaskConfig(), tmp_path / "m1", workers=1, progress=False)
    two = compute_folder_masks(both, MaskConfig(), tmp_path / "m2", workers=2, progress=False)
    assert [r.source for r in one] == [r.source for r in two] == [e.source for e in both.entries]
    for a, b in zip(one, two, strict=True):
        assert not b.cached and a.n_masks == b.n_masks
        assert np.array_equal(load_masks(a.cache_file), load_masks(b.cache_file))
