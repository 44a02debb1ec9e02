"""The few-shot benchmark's methods on real crops: windows, prototypes, registration, masks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from omnienc.adapters.segmentation import (
    WindowFeatures,
    best_threshold,
    centred_crop,
    mean_prototypes,
    pool_prototypes,
    window_similarity,
)
from omnienc.benchmarks.fewshot_methods import (
    EncoderMethods,
    intensity_mask,
    native_mask,
    score,
    truth_box,
    within_mm,
)
from omnienc.benchmarks.registration import (
    RegistrationConfig,
    itk_threads,
    majority_vote,
    register_atlas,
    to_sitk,
    warp_labels,
    working_image,
)
from omnienc.checkpoint import load_encoder
from omnienc.data.labeled import read_label_map
from omnienc.encoders import build_encoder
from omnienc.io import Volume, read_volume
from omnienc.pretext.segment import (
    load_incontext_head,
    resample_to_grid,
    segment_fewshot,
)
from omnienc.transforms import preprocess_volume

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "omnienc-cpu30min"
LIVER = 5


def crop(volume: Volume, labels: np.ndarray, box: tuple[slice, ...]) -> tuple[Volume, np.ndarray]:
    """A sub-volume with its affine shifted to the box, and its labels."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    array = np.ascontiguousarray(volume.array[box])
    return dataclasses.replace(volume, array=array, affine=volume.affine @ shift), labels[box]


CT_SM_BOX = (slice(20, 80), slice(20, 80), slice(0, 30))


@pytest.fixture(scope="module")
def ct_sm_full(volumes: Path) -> tuple[Volume, np.ndarray]:
    ts = volumes / "totalsegmentator"
    image = read_volume(ts / "example_ct_sm.nii.gz")
    return image, read_label_map(ts / "example_seg.nii.gz").array.astype(np.int64)


@pytest.fixture(scope="module")
def ct_sm(ct_sm_full: tuple[Volume, np.ndarray]) -> tuple[Volume, np.ndarray]:
    return crop(*ct_sm_full, CT_SM_BOX)


@pytest.fixture(scope="module")
def ct_dicom(volumes: Path) -> tuple[Volume, np.ndarray]:
    ts = volumes / "totalsegmentator"
    image = read_volume(ts / "example_ct_dicom")
    labels = read_label_map(ts / "example_seg_dicom.nii.gz").array.astype(np.int64)
    return crop(image, labels, (slice(120, 300), slice(150, 330), slice(0, 20)))


@pytest.fixture(scope="module")
def shipped():
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    encoder, pre = load_encoder(CHECKPOINT)
    head, _ = load_incontext_head(CHECKPOINT, encoder)
    return encoder, head, pre


# ------------------------------------------------------------------------------ windows


def test_centred_crop_centres_the_mask_box_and_pads_with_the_minimum():
    """The crop's centre is the mask box's (rounded up); outside the volume the image is padded
    with its minimum and the mask with 0; the pretext's reference crop is the same function."""
    from omnienc.pretext import segment

    assert segment.centred_crop is centred_crop
    image = np.arange(20 * 17 * 9, dtype=np.float32).reshape(20, 17, 9) + 5.0
    mask = np.zeros(image.shape, bool)
    mask[4:9, 6:8, 3] = True  # box centre (6, 7, 3): (lo + hi + 1) // 2 per axis, hi inclusive
    img, msk = centred_crop(image, mask, (4, 4, 4))
    np.testing.assert_array_equal(img, image[4:8, 5:9, 1:5])
    np.testing.assert_array_equal(msk, mask[4:8, 5:9, 1:5])
    corner = np.zeros(image.shape, bool)
    corner[0, 0, 0] = True  # the crop runs out of the volume on the low side of every axis
    img, msk = centred_crop(image, corner, (6, 6, 6))
    assert img.shape == msk.shape == (6, 6, 6) and img.dtype == msk.dtype == np.float32
    np.testing.assert_array_equal(img[3:, 3:, 3:], image[:3, :3, :3])
    assert (img[:3] == 5.0).all() and msk.sum() == 1.0 and msk[3, 3, 3] == 1.0
    with pytest.raises(ValueError, match="empty"):
        centred_crop(image, np.zeros(image.shape, bool), (4, 4, 4))


def test_window_features_blend_equals_a_fresh_sweep():
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny").eval()
    image = np.random.default_rng(1).normal(size=(56, 40, 20)).astype(np.float32)
    windows = WindowFeatures(encoder, image, (32, 32, 32), overlap=0.5, batch_size=3)

    def fn(feats: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
        return torch.nn.functional.interpolate(feats[-1].mean(1, keepdim=True), size=size)

    with torch.inference_mode():
        direct = sliding_window_inference(
            torch.from_numpy(image)[None, None],
            (32, 32, 32),
            3,
            lambda w: fn(encoder.forward_intermediates(w), tuple(w.shape[2:])),
            overlap=0.5,
            mode="gaussian",
            cval=float(image.min()),
        )
    assert isinstance(direct, torch.Tensor)
    np.testing.assert_allclose(windows.blend(fn), direct[0].numpy(), atol=1e-6)
    assert windows.windows > 1


def test_head_path_equals_segment_fewshot(shipped, ct_sm, ct_dicom):
    """The benchmark's cached head sweep gives segment_fewshot's mask, voxel for voxel."""
    encoder, head, pre = shipped
    (support, s_lab), (query, _) = ct_sm, ct_dicom
    prob, binary = segment_fewshot(encoder, head, pre, support, s_lab == LIVER, query, (32,) * 3)
    p = dataclasses.replace(pre, crop_foreground=False, spatial_size=None)
    s = preprocess_volume(support, p, label=s_lab)
    q = preprocess_volume(query, p)
    methods = EncoderMethods(encoder, head, (32, 32, 32))
    ref = methods.reference(s["image"][0], s["label"][0] == LIVER)
    mine = methods.head_probabilities(methods.windows(q["image"][0]), [ref])
    full = resample_to_grid(mine, q["affine"], query.shape, query.affine)
    np.testing.assert_allclose(full, prob, atol=1e-6)
    pred = native_mask(mine, q["affine"], query.shape, query.affine, 0.5)
    np.testing.assert_array_equal(pred, binary)


# ------------------------------------------------------------------------------ masks


def test_native_mask_equals_resampling_the_whole_grid():
    rng = np.random.default_rng(2)
    values = ndimage.gaussian_filter(rng.random((20, 24, 12)), 2).astype(np.float32)
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    src = np.eye(4)
    src[:3, :3] = rot * 2.0
    src[:3, 3] = [3.0, -2.0, 1.0]
    dst = np.diag([0.9, 1.1, 1.7, 1.0])
    diagonal = np.diag([2.0, 2.0, 2.0, 1.0])
    diagonal[:3, 3] = [-0.7, 0.4, 1.3]  # parallel axes: the separable path
    for threshold in (np.quantile(values, 0.9), np.quantile(values, 0.2), values.max()):
        for order in (0, 1):
            for a in (src, diagonal):
                want = resample_to_grid(values, a, (50, 40, 20), dst, order=order) > threshold
                got = native_mask(values, a, (50, 40, 20), dst, float(threshold), order=order)
                np.testing.assert_array_equal(got, want)


def test_score_counts_far_false_positives():
    truth = np.zeros((40, 40, 40), bool)
    truth[10:15, 10:15, 10:15] = True
    pred = truth.copy()
    pred[35:, 35:, 35:] = True  # 125 voxels far from the box
    box = truth_box(truth, (5, 5, 5))
    assert box == (slice(5, 20),) * 3
    s = score(pred, truth, box)
    assert s["recall"] == 1.0 and s["pred_voxels"] == 250
    assert s["far"] == pytest.approx(0.5) and s["precision"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(2 * 125 / 375, abs=1e-4)
    empty = score(np.zeros_like(truth), truth, box)
    assert empty["dice"] == 0.0 and empty["precision"] is None and empty["far"] is None


def test_within_mm_is_the_millimetre_dilation_of_a_naive_distance_map():
    mask = np.zeros((30, 24, 12), bool)
    mask[10:13, 8:10, 5] = True
    mask[25, 20, 10] = True
    spacing = (0.8, 1.0, 3.0)
    dist = ndimage.distance_transform_edt(~mask, sampling=spacing)  # on the whole grid
    for margin in (0.0, 2.5, 3.0, 7.0):
        got = within_mm(mask, spacing, margin)
        assert np.array_equal(got, dist <= margin), margin
    assert within_mm(mask, spacing, 3.0)[11, 9, 4] and not within_mm(mask, spacing, 2.9)[11, 9, 4]
    assert not within_mm(np.zeros_like(mask), spacing, 5.0).any()


def test_intensity_mask_pools_supports_and_keeps_the_largest_component():
    query = np.zeros((20, 20, 20), np.float32)
    query[2:10, 2:10, 2:10] = 1.0  # large
    query[15:17, 15:17, 15:17] = 1.0  # small
    support = np.zeros((10, 10, 10), np.float32)
    support[:5] = 1.0
    mask = support > 0
    out = intensity_mask([(support, mask), (support, mask)], query)
    assert out.sum() == 8**3 and out[5, 5, 5] and not out[16, 16, 16]


# ------------------------------------------------------------------------------ prototypes


def test_best_threshold_matches_a_naive_search():
    rng = np.random.default_rng(3)
    for _ in range(5):
        sim = np.round(rng.random((6, 7, 8)), 2)  # ties included
        mask = rng.random(sim.shape) < 0.3
        t = best_threshold(sim, mask)
        cuts = np.unique(sim)

        def dice(thr: float, sim: np.ndarray = sim, mask: np.ndarray = mask) -> float:
            pred = sim > thr
            return 2 * (pred & mask).sum() / (pred.sum() + mask.sum())

        best = max(dice(c - 1e-9) for c in cuts)
        assert dice(t) == pytest.approx(best)


def test_pool_prototypes_is_the_masked_mean_and_mean_prototypes_averages():
    feats = [torch.arange(2 * 4**3, dtype=torch.float32).reshape(1, 2, 4, 4, 4)]
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4, :, :] = 1.0  # the first two feature rows along x, exactly
    (proto,) = pool_prototypes(feats, mask)
    np.testing.assert_allclose(proto.numpy(), feats[0][0, :, :2].mean(dim=(1, 2, 3)).numpy())
    (avg,) = mean_prototypes([[proto], [proto + 2.0]])
    np.testing.assert_allclose(avg.numpy(), proto.numpy() + 1.0)


def test_window_similarity_is_cosine_averaged_over_scales():
    proto = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]
    same = [torch.tensor([3.0, 0.0])[None, :, None, None, None].expand(2, 2, 4, 4, 4)]
    same.append(torch.tensor([0.0, 1.0, 0.0])[None, :, None, None, None].expand(2, 3, 2, 2, 2))
    out = window_similarity(same, proto, (8, 8, 8))
    assert out.shape == (2, 1, 8, 8, 8)
    np.testing.assert_allclose(out.numpy(), 1.0, atol=1e-6)
    half = [same[0], torch.tensor([1.0, 0.0, 0.0])[None, :, None, None, None].expand(2, 3, 2, 2, 2)]
    np.testing.assert_allclose(window_similarity(half, proto, (8, 8, 8)).numpy(), 0.5, atol=1e-6)


def test_prototype_matcher_finds_the_support_in_itself(shipped, ct_sm):
    """The support as its own query: the liver is found well above chance."""
    encoder, _, pre = shipped
    support, labels = ct_sm
    p = dataclasses.replace(pre, crop_foreground=False, spatial_size=None)
    s = preprocess_volume(support, p, label=labels)
    mask = s["label"][0] == LIVER
    methods = EncoderMethods(encoder, None, (32, 32, 32))
    ref = methods.reference(s["image"][0], mask)
    sim = methods.similarity(methods.windows(s["image"][0]), [[ref]])
    assert sim.shape == (1, *mask.shape)
    threshold = best_threshold(sim[0], mask)
    pred = native_mask(sim[0], s["affine"], support.shape, support.affine, threshold)
    truth = labels == LIVER
    dice = score(pred, truth, truth_box(truth, (1, 1, 1)))["dice"]
    chance = 2 * mask.mean() / (1 + mask.mean())  # Dice of predicting everything
    assert dice > 0.6 and dice > 2 * chance


# ------------------------------------------------------------------------------ registration


def _moved(volume: Volume, labels: np.ndarray) -> tuple[Volume, np.ndarray]:
    """The scan rotated by 8 degrees about S around the crop's centre and shifted by (2, -3, 1)
    voxels, then cropped like the support: real anatomy up to the crop's border."""
    a = np.deg2rad(8.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    centre = np.array([(s.start + s.stop - 1) / 2 for s in CT_SM_BOX])
    offset = centre - rot @ centre + np.array([2.0, -3.0, 1.0])
    image = ndimage.affine_transform(volume.array, rot, offset, order=1, mode="nearest")
    moved = ndimage.affine_transform(labels, rot, offset, order=0, mode="constant")
    return crop(dataclasses.replace(volume, array=image.astype(np.float32)), moved, CT_SM_BOX)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_registration_recovers_a_known_affine_motion(ct_sm, ct_sm_full):
    support, labels = ct_sm
    query, truth = _moved(*ct_sm_full)
    structures = (LIVER, 1, 6)  # liver, spleen, stomach
    before = [_dice(labels == s, truth == s) for s in structures]
    for cfg, floor in (
        (RegistrationConfig(demons_shrink=(), demons_iterations=()), 0.93),  # affine stage
        (RegistrationConfig(), 0.85),  # + demons, tuned for other subjects, not for this
    ):
        reg = register_atlas(
            working_image(support.array, support.affine, "CT", cfg.spacing),
            working_image(query.array, query.affine, "CT", cfg.spacing),
            cfg,
        )
        warped = warp_labels(reg, labels, support.affine, query.shape, query.affine)
        after = [_dice(warped == s, truth == s) for s in structures]
        assert min(after) > floor, (before, after)
        assert np.mean(after) > np.mean(before) + 0.15, (before, after)


def test_registration_is_deterministic_and_identity_on_itself(ct_sm):
    support, labels = ct_sm
    cfg = RegistrationConfig(demons_shrink=(2,), demons_iterations=(5,))
    image = working_image(support.array, support.affine, "CT", cfg.spacing)
    regs = [register_atlas(image, image, cfg) for _ in range(2)]
    warped = [warp_labels(r, labels, support.affine, support.shape, support.affine) for r in regs]
    np.testing.assert_array_equal(warped[0], warped[1])
    assert _dice(warped[0] == LIVER, labels == LIVER) > 0.97


_TWO_SCANS = """
import sys
import numpy as np
from omnienc.benchmarks.registration import RegistrationConfig, register_atlas, working_image
from omnienc.data.labeled import read_label_map
from omnienc.io import read_volume
ts = sys.argv[1]
cfg = RegistrationConfig(spacing=4.0, threads=int(sys.argv[2]))
images = [read_volume(f"{ts}/{name}") for name in ("example_ct_sm.nii.gz", "example_ct_dicom")]
work = [working_image(v.array, v.affine, "CT", cfg.spacing) for v in images]
reg = register_atlas(work[0], work[1], cfg)
print(repr([*reg.affine.GetParameters(), reg.max_displacement]))
"""


def test_registration_gives_the_same_transform_in_every_run(volumes: Path):
    """Two processes, one registration each: the transforms are equal to the last digit.

    With the machine's threads (the old behaviour: ITK's global default) they differed.
    """
    import subprocess
    import sys

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with itk_threads(1):
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    ts = str(volumes / "totalsegmentator")
    runs = [
        subprocess.run(
            [sys.executable, "-c", _TWO_SCANS, ts, "1"], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and runs[0].startswith("[")


def test_warp_labels_box_equals_warping_the_whole_grid(ct_sm, ct_dicom):
    (support, s_lab), (query, _) = ct_sm, ct_dicom
    cfg = RegistrationConfig(affine_iterations=10, demons_shrink=(2,), demons_iterations=(3,))
    reg = register_atlas(
        working_image(support.array, support.affine, "CT", 4.0),
        working_image(query.array, query.affine, "CT", 4.0),
        cfg,
    )
    got = warp_labels(reg, s_lab, support.affine, query.shape, query.affine)
    full = sitk.Resample(
        to_sitk(s_lab.astype(np.uint16), support.affine),
        to_sitk(np.zeros(query.shape, np.uint8), query.affine),
        reg.transform,
        sitk.sitkNearestNeighbor,
        0,
    )
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(full).transpose(2, 1, 0))
    assert got.any()


def test_majority_vote_keeps_what_at_least_half_the_atlases_say():
    a, b, c = (np.array(v, bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]))
    np.testing.assert_array_equal(majority_vote([a]), a)
    np.testing.assert_array_equal(majority_vote([a, b]), a | b)
    np.testing.assert_array_equal(majority_vote([a, b, c]), [1, 0, 0, 0])
    with pytest.raises(ValueError):
        majority_vote([])
