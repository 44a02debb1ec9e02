"""Preprocessing parameters and the MONAI pipeline, against analytic values and naive references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import (
    ModalityNormalize,
    ModalityNormalized,
    fewshot_window,
    preprocess_volume,
)

CT = "totalsegmentator/example_ct_sm.nii.gz"  # (122, 101, 30) at 3 mm, int16 HU
CT_SEG = "totalsegmentator/example_seg.nii.gz"  # its label map, same grid
MR = "nibabel/anatomical.nii"  # (33, 41, 25) at 2 mm, modality unknown
# Only what is asked for: no resampling, no cropping, no padding.
NATIVE = Preprocessing(spacing=None, crop_foreground=False)


def _volume(array: np.ndarray, modality: str, spacing: float = 1.0) -> Volume:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return Volume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        affine=affine,
        spacing=(spacing, spacing, spacing),
        modality=modality,
        modality_source="given",
        source=Path(f"synthetic_{modality}.nii.gz"),
    )


def _naive_zscore(a: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Percentile clip, then z-score over voxels above the lower clip value (all if < 1%)."""
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, percentiles)  # linear interpolation, as torch.quantile
    c = np.clip(a, lo, hi)
    fg = c > lo
    if fg.sum() < 0.01 * c.size:
        fg = np.ones_like(c, dtype=bool)
    return (c - c[fg].mean()) / c[fg].std(ddof=1)


@pytest.fixture(scope="module")
def ct(volumes: Path) -> Volume:
    return read_volume(volumes / CT)


@pytest.fixture(scope="module")
def mr(volumes: Path) -> Volume:
    return read_volume(volumes / MR)


# --- intensity normalisation -------------------------------------------------------------------


def test_ct_window_maps_hu_linearly_to_unit_interval():
    hu = torch.tensor([-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 3000.0]).reshape(1, 1, 1, 7)
    out = ModalityNormalize(ct_window=(-1000.0, 1000.0), percentiles=(0.5, 99.5))(hu, "CT")
    expected = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    np.testing.assert_allclose(out.reshape(-1).numpy(), expected, atol=1e-7)
    assert out.dtype == torch.float32


def test_ct_window_on_real_ct_matches_formula(ct: Volume):
    out = preprocess_volume(ct, NATIVE)["image"][0]
    expected = (np.clip(ct.array, -1000.0, 1000.0) + 1000.0) / 2000.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Air (-1000 HU and below) is 0; water (0 HU) would be 0.5.
    assert np.all(out[ct.array <= -1000.0] == 0.0)


@pytest.mark.parametrize("modality", ["MR", "PET", "unknown"])
def test_non_ct_is_percentile_clipped_and_zscored_like_naive(mr: Volume, modality: str):
    out = ModalityNormalize((-1000.0, 1000.0), (0.5, 99.5))(
        torch.from_numpy(mr.array[None]), modality
    )
    expected = _naive_zscore(mr.array, (0.5, 99.5))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-4)
    # Foreground (above the lower clip value) has mean 0 and standard deviation 1.
    lo = np.percentile(mr.array, 0.5)
    fg = out[0].numpy()[mr.array > lo]
    assert abs(fg.mean()) < 1e-4
    assert abs(fg.std(ddof=1) - 1.0) < 1e-4


def test_percentile_clip_removes_an_outlier():
    rng = np.random.default_rng(0)
    a = rng.normal(100.0, 10.0, size=(16, 16, 16)).astype(np.float32)
    a[0, 0, 0] = 1e6  # a hot pixel must not dominate the statistics
    out = ModalityNormalize((-1000.0, 1000.0), (1.0, 99.0))(torch.from_numpy(a[None]), "MR")
    np.testing.assert_allclose(out[0].numpy(), _naive_zscore(a, (1.0, 99.0)), atol=1e-4)
    assert float(out.max()) < 5.0


def test_dictionary_wrapper_takes_modality_from_data_and_defaults_to_unknown(mr: Volume):
    img = torch.from_numpy(mr.array[None])
    wrapper = ModalityNormalized(keys="image", ct_window=(-1000.0, 1000.0), percentiles=(0.5, 99.5))
    as_ct = wrapper({"image": img, "modality": "CT"})["image"]
    assert float(as_ct.min()) >= 0.0 and float(as_ct.max()) <= 1.0
    no_modality = wrapper({"image": img})["image"]
    expected = _naive_zscore(mr.array, (0.5, 99.5))
    np.testing.assert_allclose(no_modality[0].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("modality", ["MR", "PET", "unknown"])
def test_constant_volume_becomes_zeros(modality: str):
    vol = _volume(np.full((12, 10, 8), 7.0), modality)
    out = preprocess_volume(vol, Preprocessing(spacing=(2.0, 2.0, 2.0)))["image"]
    assert np.all(np.isfinite(out))
    assert np.all(out == 0.0)


def test_constant_ct_volume_is_finite_and_windowed():
    vol = _volume(np.zeros((12, 10, 8)), "CT")  # water everywhere
    out = preprocess_volume(vol, Preprocessing(spacing=(2.0, 2.0, 2.0)))["image"]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0.5)


# --- geometry ----------------------------------------------------------------------------------


def test_resampling_sets_spacing_and_shape(ct: Volume):
    out = preprocess_volume(ct, Preprocessing(spacing=(2.0, 2.0, 2.0), crop_foreground=False))
    np.testing.assert_allclose(np.linalg.norm(out["affine"][:3, :3], axis=0), [2.0, 2.0, 2.0])
    # The first voxel centre stays where it was; the field of view is kept to within a voxel.
    np.testing.assert_allclose(out["affine"][:3, 3], ct.affine[:3, 3], atol=1e-4)
    native = np.array(ct.shape)
    shape = np.array(out["image"].shape[1:])
    assert np.all(np.abs(shape - native * 3.0 / 2.0) <= 1.0), (native, shape)
    assert out["image"].dtype == np.float32


def test_spatial_size_pads_and_centre_crops_exactly(mr: Volume):
    target = (32, 32, 32)  # (33, 41, 25): crop X by 1, crop Y by 9, pad Z by 7
    out = preprocess_volume(
        mr, Preprocessing(spacing=None, crop_foreground=False, spatial_size=target)
    )
    img = out["image"][0]
    assert img.shape == target
    full = _naive_zscore(mr.array, (0.5, 99.5)).astype(np.float32)
    x0, y0 = (33 - 32) // 2, (41 - 32) // 2
    z0 = (32 - 25) // 2
    np.testing.assert_allclose(img[:, :, z0 : z0 + 25], full[x0 : x0 + 32, y0 : y0 + 32], atol=1e-4)


def test_padding_uses_the_image_minimum(ct: Volume):
    # The abdomen fills every z-line of this crop, so per-line minima are tissue, not air.
    out = preprocess_volume(ct, Preprocessing(spatial_size=(64, 64, 64)))["image"][0]
    z_pad = (64 - 44) // 2  # 44 slices at 2 mm, padded symmetrically to 64
    assert np.all(out[:, :, :z_pad] == out.min())


def test_label_map_follows_the_image(ct: Volume, volumes: Path):
    seg = read_volume(volumes / CT_SEG).array
    out = preprocess_volume(ct, Preprocessing(spatial_size=(96, 96, 48)), label=seg)
    assert out["label"].shape == out["image"].shape == (1, 96, 96, 48)
    assert out["label"].dtype == np.int64
    assert set(np.unique(out["label"])) <= set(np.unique(seg).astype(np.int64))
    assert len(np.unique(out["label"])) > 10  # nearest-neighbour keeps the organs


def test_label_map_stays_aligned_with_the_image(ct: Volume):
    # A label made from the image itself: voxels above 0 HU. CT window (-2000, 2000) is
    # monotonic on this volume, so 0 HU maps to exactly 0.5.
    label = (ct.array > 0).astype(np.int64)
    pre = Preprocessing(spacing=None, ct_window=(-2000.0, 2000.0))  # crop only: exact
    out = preprocess_volume(ct, pre, label=label)
    np.testing.assert_array_equal(out["label"], out["image"] > 0.5)
    # Resampled (bilinear image, nearest label): agreement except at boundaries.
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0), ct_window=(-2000.0, 2000.0))
    out = preprocess_volume(ct, pre, label=label)
    assert out["label"].shape == out["image"].shape
    assert np.mean(out["label"] == (out["image"] > 0.5)) > 0.9


def test_preprocessing_is_deterministic(ct: Volume, volumes: Path):
    seg = read_volume(volumes / CT_SEG).array
    pre = Preprocessing(spatial_size=(64, 64, 48))
    a = preprocess_volume(ct, pre, label=seg)
    b = preprocess_volume(ct, pre, label=seg)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["affine"], b["affine"])


# --- Preprocessing: validation and serialisation ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"spacing": (0.0, 1.0, 1.0)}, "spacing"),
        ({"spacing": (-1.0, 1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"ct_window": (1000.0, -1000.0)}, "ct_window"),
        ({"ct_window": (0.0, 0.0)}, "ct_window"),
        ({"percentiles": (99.5, 0.5)}, "percentiles"),
        ({"percentiles": (-1.0, 99.0)}, "percentiles"),
        ({"percentiles": (1.0, 101.0)}, "percentiles"),
        ({"spatial_size": (0, 32, 32)}, "spatial_size"),
        ({"spatial_size": (32, 32)}, "spatial_size"),
        ({"foreground_margin": -1}, "foreground_margin"),
    ],
)
def test_invalid_preprocessing_is_refused(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=field) as info:
        Preprocessing(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)  # names the bad value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spacing": (float("nan"), 1.0, 1.0)},
        {"spacing": (float("inf"), 1.0, 1.0)},
        {"ct_window": (float("nan"), 1000.0)},
        {"ct_window": (-1000.0, float("inf"))},
        {"ct_window": (-1000.0, 0.0, 1000.0)},
    ],
)
def test_non_finite_or_malformed_values_are_refused(kwargs: dict):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Preprocessing(**kwargs)


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(),
        Preprocessing(spacing=None, crop_foreground=False, spatial_size=(8, 16, 32)),
        Preprocessing(spacing=(1.5, 1.5, 3.0), ct_window=(-200.0, 300.0), percentiles=(1, 99)),
    ],
)
def test_to_dict_from_dict_round_trip_through_json(pre: Preprocessing):
    d = json.loads(json.dumps(pre.to_dict()))
    back = Preprocessing.from_dict(d)
    assert back == pre
    assert back.to_dict() == pre.to_dict()
    assert all(not isinstance(v, tuple) for v in pre.to_dict().values())


def test_from_dict_refuses_unknown_keys():
    d = Preprocessing().to_dict() | {"spacnig": [1, 1, 1]}
    with pytest.raises(ValueError, match="spacnig"):
        Preprocessing.from_dict(d)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="ct_window"):
        Preprocessing.from_dict({"ct_window": [500, -500]})


def test_equal_preprocessing_serialises_identically():
    a, b = Preprocessing(spacing=(2, 2, 2)), Preprocessing(spacing=(2.0, 2.0, 2.0))
    assert a == b
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


# --- already z-scored MR (BraTS) ---------------------------------------------------------------


@pytest.mark.parametrize("sequence", ["Flair", "T1c"])
def test_brats_background_stays_background(sequence: str, volumes: Path):
    """BraTS images are z-scored already, with a constant negative background at the minimum.

    On a crop (half the brain plus background on every side), the MR pipeline must keep the
    whole brain, z-score it with brain statistics, leave the background at the minimum and not
    count it as foreground.
    """
    from omnienc.transforms import select_foreground

    case = volumes / "brats/brats_2013_pat0005_1"
    image = read_volume(case / f"{sequence}_subtrMeanDivStd.nii.gz")
    assert image.modality == "MR" and float(image.array.min()) < 0
    brain = read_volume(case / "brainmask.nii.gz").array > 0
    box = (slice(30, 210), slice(10, 210), slice(60, 120))  # brain bbox is 50..190, 24..192
    crop = Volume(
        array=np.ascontiguousarray(image.array[box]),
        affine=image.affine.copy(),  # 1 mm, axis-aligned: the crop's offset does not matter
        spacing=image.spacing,
        modality="MR",
        modality_source="filename",
        source=image.source,
    )
    background = float(crop.array.min())
    assert np.all(crop.array[~brain[box]] == background)
    out = preprocess_volume(crop, Preprocessing(), label=brain[box].astype(np.float32))
    img, mask = out["image"][0], out["label"][0] > 0
    # Nothing of the brain is cropped away (nearest-neighbour 2 mm resampling: 1/8 the voxels).
    assert mask.sum() == pytest.approx(brain[box].sum() / 8, rel=0.02)
    # ... and the background around it is: 180 x 200 x 60 mm -> the 2 mm brain box (+ margin).
    assert img.shape[0] < 180 // 2 and img.shape[1] < 200 // 2
    assert img.shape[2] == 60 // 2  # the brain reaches every slice of the crop
    # Brain statistics: z-scored inside the brain, background at the output minimum.
    assert float(img[mask].mean()) == pytest.approx(0.0, abs=0.05)
    assert float(img[mask].std()) == pytest.approx(1.0, abs=0.05)
    assert np.all(img[~mask] == img.min())
    fg = select_foreground(torch.from_numpy(out["image"])).numpy()[0]
    assert not (fg & ~mask).any()  # background never counts as foreground
    assert (fg & mask).sum() > 0.95 * mask.sum()


def test_fewshot_window_covers_192_mm_in_multiples_of_the_stride():
    """MASS's 192 mm: 96 voxels at 2 mm, 128 at 1.5 mm, 48 at 4 mm; each axis on its own."""
    assert fewshot_window((2.0, 2.0, 2.0)) == (96, 96, 96)
    assert fewshot_window((1.5, 1.5, 1.5)) == (128, 128, 128)
    assert fewshot_window((4.0, 4.0, 4.0)) == (48, 48, 48)
    # pyradiomics brain MR: 0.78 mm in plane, 6.5 mm slices -> 245.8 and 29.5 voxels
    assert fewshot_window((0.78125, 0.78125, 6.5)) == (240, 240, 32)
    assert fewshot_window((2.0, 2.0, 2.0), multiple=32, field_of_view_mm=128.0) == (64, 64, 64)
    assert fewshot_window((50.0, 50.0, 50.0)) == (32, 32, 32)  # never below two strides
    assert fewshot_window(None) is None  # native grid: the caller falls back
    for bad in ((2.0, 0.0, 2.0), (2.0, 2.0)):
        with pytest.raises(ValueError, match="spacing must be three positive numbers"):
            fewshot_window(bad)
    with pytest.raises(ValueError, match="must be positive"):
        fewshot_window((2.0, 2.0, 2.0), multiple=0)
    with pytest.raises(ValueError, match="must be positive"):
        fewshot_window((2.0, 2.0, 2.0), field_of_view_mm=-1.0)
