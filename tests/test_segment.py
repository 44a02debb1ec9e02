"""Few-shot in-context segmentation on real CT: support CT + liver mask -> query CT mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from omnienc.checkpoint import save_encoder
from omnienc.encoders import build_encoder
from omnienc.errors import CheckpointError, DataError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import HeadConfig, InContextHead
from omnienc.pretext.segment import (
    DEFAULT_CROP,
    HEAD_NAME,
    default_window,
    load_incontext_head,
    resample_to_grid,
    segment_fewshot,
    segment_files,
)

HEAD = HeadConfig(dim=16, num_learned_tokens=1, depth=1, num_heads=2, mlp_ratio=1.0)
# A coarse spacing (and overlap 0.25) keeps the query to 8 sliding 32^3 windows.
PRE = Preprocessing(spacing=(8.0, 8.0, 8.0))
LIVER = 5


@pytest.fixture(scope="module")
def ts(volumes: Path) -> Path:
    return volumes / "totalsegmentator"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    head = InContextHead(encoder.feature_info, HEAD)
    path = tmp_path_factory.mktemp("ckpt") / "mass"
    meta = {"pretext": "mass", "incontext_head": HEAD.to_dict(), "crop_size": [32, 32, 32]}
    return save_encoder(encoder, path, PRE, meta=meta, extra={"incontext_head": head})


@pytest.fixture(scope="module")
def segmented(checkpoint: Path, ts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "liver.nii.gz"
    return segment_files(
        checkpoint,
        ts / "example_ct_sm.nii.gz",
        ts / "example_seg.nii.gz",
        ts / "example_ct.nii.gz",
        out,
        label=LIVER,
        overlap=0.25,
        probabilities_path=out.with_name("liver_prob.nii.gz"),
    )


def test_segment_files_writes_a_mask_on_the_query_grid(segmented: Path, ts: Path):
    query = nib.load(ts / "example_ct.nii.gz")
    out = nib.load(segmented)
    assert out.shape == query.shape
    np.testing.assert_allclose(out.affine, query.affine, atol=1e-5)
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    prob = np.asarray(nib.load(segmented.with_name("liver_prob.nii.gz")).dataobj)
    assert prob.shape == query.shape and prob.min() >= 0.0 and prob.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(out.dataobj), prob > 0.5)


def test_non_ras_query_keeps_its_own_voxel_order(checkpoint: Path, ts: Path, segmented, tmp_path):
    """An LPS NIfTI query gets an LPS mask: the same file grid, voxel for voxel."""
    ras = nib.load(ts / "example_ct.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.shape[:2]) - 1
    lps = nib.Nifti1Image(np.asarray(ras.dataobj)[::-1, ::-1], ras.affine @ flip)
    query = tmp_path / "query_lps.nii.gz"
    nib.save(lps, query)
    out = segment_files(
        checkpoint,
        ts / "example_ct_sm.nii.gz",
        ts / "example_seg.nii.gz",
        query,
        tmp_path / "mask.nii",
        label=LIVER,
        overlap=0.25,
    )
    written = nib.load(out)
    assert written.shape == lps.shape
    np.testing.assert_allclose(written.affine, lps.affine, atol=1e-5)
    reference = np.asarray(nib.load(segmented).dataobj)
    np.testing.assert_array_equal(np.asarray(written.dataobj), reference[::-1, ::-1])


def test_segment_fewshot_in_memory(checkpoint: Path, ts: Path):
    encoder = build_encoder("resconv_tiny").train()
    head = load_incontext_head(checkpoint, encoder)[0].train()
    support = read_volume(ts / "example_ct_sm.nii.gz")
    mask = read_volume(ts / "example_seg.nii.gz").array == LIVER
    query = read_volume(ts / "example_mr_sm.nii.gz")  # any query works, even another modality
    prob, binary = segment_fewshot(
        encoder, head, PRE, support, mask, query, crop_size=(32, 32, 32), overlap=0.25
    )
    assert prob.shape == binary.shape == query.shape
    assert prob.dtype == np.float32 and binary.dtype == bool
    assert np.isfinite(prob).all() and 0.0 <= prob.min() <= prob.max() <= 1.0
    assert encoder.training and head.training  # modes restored
    with pytest.raises(ValueError, match="empty"):
        segment_fewshot(encoder, head, PRE, support, np.zeros_like(mask), query)


def test_default_window_is_192_mm_at_the_encoder_spacing():
    """96 voxels at 2 mm; a native-grid encoder keeps its pretraining crop (else 64^3)."""
    encoder = build_encoder("resconv_tiny")
    assert default_window(encoder, Preprocessing()) == (96, 96, 96)
    assert default_window(encoder, PRE) == (32, 32, 32)  # 24 voxels of 8 mm, up to the stride
    assert default_window(encoder, Preprocessing(spacing=(1.0, 1.0, 3.0))) == (192, 192, 64)
    native = Preprocessing(spacing=None)
    assert default_window(encoder, native, [32, 32, 16]) == (32, 32, 16)
    assert default_window(encoder, native) == DEFAULT_CROP


def test_segment_defaults_to_the_192_mm_window_not_the_pretraining_crop(
    ts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """segment_files and segment_fewshot sweep 192 mm windows unless a crop size is given;
    the checkpoint's pretraining crop (48^3 here) is not the default any more."""
    import omnienc.pretext.segment as seg

    sizes: list[tuple[int, ...]] = []
    real = seg.sliding_window_inference

    def spy(*args, **kwargs):
        sizes.append(tuple(kwargs["roi_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "sliding_window_inference", spy)
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    head = InContextHead(encoder.feature_info, HEAD)
    meta = {"pretext": "mass", "incontext_head": HEAD.to_dict(), "crop_size": [48, 48, 48]}
    coarse = Preprocessing(spacing=(12.0, 12.0, 12.0))  # 192 mm = 16 voxels -> 2 strides, 32
    ckpt = save_encoder(encoder, tmp_path / "c", coarse, meta=meta, extra={HEAD_NAME: head})
    files = (ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz", ts / "example_ct_sm.nii.gz")
    kwargs = {"label": LIVER, "overlap": 0.25}
    segment_files(ckpt, *files, tmp_path / "a.nii.gz", **kwargs)
    segment_files(ckpt, *files, tmp_path / "b.nii.gz", crop_size=(48, 48, 32), **kwargs)
    support = read_volume(files[0])
    mask = read_volume(files[1]).array == LIVER
    segment_fewshot(encoder.eval(), head.eval(), coarse, support, mask, support, overlap=0.25)
    assert sizes == [(32, 32, 32), (48, 48, 32), (32, 32, 32)]


class _Identity(torch.nn.Module):
    """An 'encoder' whose one feature map is its input (stride 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = [{"num_chs": 1, "reduction": 1}]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


class _Threshold(torch.nn.Module):
    """A 'head' that segments query voxels brighter than a level, whatever the reference."""

    def forward(self, ref_feats, ref_masks, query_feats, out_size):
        assert ref_masks.shape[:2] == (query_feats[0].shape[0], 1) and ref_masks.sum() > 0
        return (query_feats[0] - 0.55) * 1000.0


def test_sliding_window_and_grids_line_up(ts: Path):
    """With a known 'head' (CT above 100 HU) the output equals thresholding the query itself."""
    query = read_volume(ts / "example_ct.nii.gz")
    support = read_volume(ts / "example_ct_sm.nii.gz")
    mask = read_volume(ts / "example_seg.nii.gz").array == LIVER
    native = Preprocessing(spacing=None)
    _, binary = segment_fewshot(
        _Identity(), _Threshold(), native, support, mask, query, crop_size=(48, 40, 32)
    )
    np.testing.assert_array_equal(binary, query.array > 100.0)


def test_resample_to_grid_inverts_the_preprocessing_grid(ts: Path):
    """A linear function of world position, sampled on the 6 mm grid, comes back exactly."""
    from omnienc.transforms import preprocess_volume

    query = read_volume(ts / "example_ct.nii.gz")
    coarse = preprocess_volume(query, Preprocessing(spacing=(6.0, 6.0, 6.0), crop_foreground=False))
    shape, affine = coarse["image"].shape[1:], coarse["affine"]

    def world(shape_, affine_):
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape_], indexing="ij"), -1)
        return ijk @ affine_[:3, :3].T + affine_[:3, 3]

    weights = np.array([0.3, -0.2, 0.1])
    values = world(shape, affine) @ weights
    back = resample_to_grid(values, affine, query.shape, query.affine)
    expected = world(query.shape, query.affine) @ weights
    inner = (slice(3, -3),) * 3  # away from the edge clamp
    np.testing.assert_allclose(back[inner], expected[inner], atol=1e-3)


def test_mismatched_support_grid_names_the_mask(checkpoint: Path, ts: Path, tmp_path):
    with pytest.raises(DataError, match=r"example_seg_mr\.nii\.gz") as exc:
        segment_files(
            checkpoint,
            ts / "example_ct_sm.nii.gz",
            ts / "example_seg_mr.nii.gz",
            ts / "example_ct.nii.gz",
            tmp_path / "out.nii.gz",
        )
    assert "grid" in str(exc.value)
    assert not (tmp_path / "out.nii.gz").exists()


def test_checkpoint_without_head_is_refused(ts: Path, tmp_path):
    plain = save_encoder(build_encoder("resconv_tiny"), tmp_path / "plain", PRE)
    with pytest.raises(CheckpointError, match="no in-context head") as exc:
        segment_files(
            plain,
            ts / "example_ct_sm.nii.gz",
            ts / "example_seg.nii.gz",
            ts / "example_ct.nii.gz",
            tmp_path / "out.nii.gz",
        )
    assert str(plain) in str(exc.value) and "omnienc pretrain" in str(exc.value)


def test_absent_label_names_the_mask_file(checkpoint: Path, ts: Path, tmp_path):
    with pytest.raises(DataError, match=r"example_seg\.nii\.gz") as exc:
        segment_files(
            checkpoint,
            ts / "example_ct_sm.nii.gz",
            ts / "example_seg.nii.gz",
            ts / "example_ct.nii.gz",
            tmp_path / "out.nii.gz",
            label=12,
        )
    assert "no voxel has label 12" in str(exc.value) and "5" in str(exc.value)
