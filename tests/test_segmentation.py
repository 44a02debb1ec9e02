"""Segmentation adapter: decoder shapes, frozen vs fine-tuned training on real CT, prediction on
a file's own grid, MedSegBench items, and the inputs it must refuse."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from omnienc.adapters.segmentation import (
    SegDecoderConfig,
    SegItem,
    SegmentationDecoder,
    build_segmentation_model,
    dice_scores,
    evaluate_segmentation,
    items_from_pairs,
    load_segmentation_model,
    medsegbench_items,
    predict_volume,
    save_segmentation_model,
    select_structures,
    train_segmentation,
)
from omnienc.checkpoint import save_encoder
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.data.medsegbench import MedSegBench
from omnienc.encoders import ENCODERS, build_encoder
from omnienc.errors import CheckpointError, DataError
from omnienc.io import read_volume, write_volume
from omnienc.preprocessing import Preprocessing

CT = "totalsegmentator/example_ct_sm.nii.gz"  # (122, 101, 30) at 3 mm
CT_SEG = "totalsegmentator/example_seg.nii.gz"
LIVER, SPLEEN = 5, 1
PRE = Preprocessing(spacing=(4.0, 4.0, 4.0))  # the CT becomes ~(92, 76, 23) voxels
CROP = (32, 32, 16)  # deepest resconv grid 2 x 2 x 1
# A small 3D ViT: all four intermediates at stride 8.
VIT_SMALL_CFG = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
ENCODER_CASES = [(name, {}) for name in ENCODERS] + [("vit3d_tiny", VIT_SMALL_CFG)]


@pytest.fixture(scope="module")
def ct_items(volumes: Path) -> list[SegItem]:
    """The real CT with liver (1) and spleen (2)."""
    return items_from_pairs([(volumes / CT, volumes / CT_SEG)], PRE, structures=[LIVER, SPLEEN])


@pytest.fixture(scope="module")
def frozen_run(ct_items: list[SegItem]):
    """40 steps of a frozen random-init resconv_tiny + decoder on crops of the real CT."""
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    before = copy.deepcopy(encoder.state_dict())
    config = SegDecoderConfig(num_classes=3, width=16, lr=3e-3)
    model, history = train_segmentation(
        encoder, ct_items, ct_items, config, CROP, steps=40, batch_size=2, seed=0, val_every=20
    )
    return model, history, before


@pytest.mark.parametrize(("name", "overrides"), ENCODER_CASES)
def test_decoder_output_shape_for_every_encoder(name: str, overrides: dict) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(name, **overrides)
    model = build_segmentation_model(encoder, SegDecoderConfig(num_classes=4, width=8))
    x = torch.randn(2, 1, 20, 33, 40)  # no axis a multiple of the coarsest stride
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 4, 20, 33, 40)
    assert torch.isfinite(out).all()


def test_vit_top_down_path_is_a_sum_of_laterals() -> None:
    """Equal strides: no upsampling between levels, only at the end (stride 8 -> input)."""
    info = [{"num_chs": 3, "reduction": 8}] * 4
    dec = SegmentationDecoder(info, num_classes=2, width=4)
    feats = [torch.randn(1, 3, 2, 2, 2) for _ in range(4)]
    summed = sum(lat(f) for lat, f in zip(dec.lateral, feats, strict=True))
    expected = torch.nn.functional.interpolate(
        dec.classifier(dec.block(summed)), size=(16, 16, 16), mode="trilinear"
    )
    torch.testing.assert_close(dec(feats, (16, 16, 16)), expected)


def test_decoder_refuses_strides_that_do_not_nest() -> None:
    with pytest.raises(ValueError, match="divide"):
        SegmentationDecoder([{"num_chs": 4, "reduction": 2}, {"num_chs": 4, "reduction": 3}], 2)


@pytest.mark.parametrize(
    ("name", "overrides"), [("resconv_tiny", {}), ("vit3d_tiny", VIT_SMALL_CFG)]
)
@pytest.mark.parametrize("freeze", [True, False])
def test_gradients_reach_exactly_the_trainable_parameters(
    name: str, overrides: dict, freeze: bool
) -> None:
    torch.manual_seed(0)
    model = build_segmentation_model(
        build_encoder(name, **overrides), SegDecoderConfig(num_classes=3, freeze_encoder=freeze)
    )
    model.train()
    assert model.decoder.training and model.encoder.training is not freeze
    model(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    for p in model.decoder.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for n, p in model.encoder.named_parameters():
        assert p.requires_grad is not freeze
        assert (p.grad is None) is freeze, n


def test_frozen_training_keeps_encoder_and_learns_decoder(frozen_run) -> None:
    model, _, before = frozen_run
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.encoder.training
    # GroupNorm scales start at exactly 1: training moved them.
    norms = [m for m in model.decoder.modules() if isinstance(m, nn.GroupNorm)]
    assert any(not torch.allclose(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert model.roi_size == CROP


def test_training_reduces_the_loss_on_real_ct(frozen_run) -> None:
    _, history, _ = frozen_run
    losses = history["loss"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])
    assert [v["step"] for v in history["val"]] == [20, 40]
    assert len(history["val"][-1]["dice"]) == 2


def test_fine_tuning_changes_the_encoder(ct_items: list[SegItem]) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    before = copy.deepcopy(encoder.state_dict())
    config = SegDecoderConfig(num_classes=3, width=8, freeze_encoder=False)
    model, _ = train_segmentation(encoder, ct_items, None, config, CROP, steps=3, batch_size=1)
    after = model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("conv1.weight") for k in changed)


def test_evaluate_reports_dice_per_structure(frozen_run, ct_items: list[SegItem]) -> None:
    model, _, _ = frozen_run
    result = evaluate_segmentation(model, ct_items, ["liver", "spleen"])
    assert set(result["dice"]) == {"liver", "spleen"} and result["n_items"] == 1
    for v in result["dice"].values():
        assert v is not None and 0.0 <= v <= 1.0
    assert result["mean_dice"] == pytest.approx(np.mean(list(result["dice"].values())))
    assert result["per_item"][0]["id"].endswith("example_ct_sm.nii.gz")


def test_dice_scores_match_a_naive_dice() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (2, 1, 6, 7, 5))
    truth = rng.integers(0, 3, (2, 1, 6, 7, 5))  # class 3 absent from the truth
    got = dice_scores(torch.from_numpy(pred), torch.from_numpy(truth), num_classes=4)
    assert got.shape == (2, 3)
    for b in range(2):
        for c in (1, 2):
            p, t = pred[b] == c, truth[b] == c
            assert got[b, c - 1] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert torch.isnan(got[b, 2])
    perfect = dice_scores(torch.from_numpy(truth), torch.from_numpy(truth), num_classes=3)
    torch.testing.assert_close(perfect, torch.ones(2, 2))


class _ThresholdModel(nn.Module):
    """Logits of 'HU > 0' on the CT window [-1000, 1000] HU scaled to [0, 1]."""

    roi_size = (32, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 0.5) * 50], dim=1)


def test_predict_volume_lands_on_the_file_grid(volumes: Path, tmp_path: Path) -> None:
    """A known voxel-wise rule survives preprocessing, sliding windows and resampling back."""
    path = volumes / "totalsegmentator/pulmonary_ct_cropped.nii.gz"  # LPS on disk, 1.5 mm
    pred = predict_volume(_ThresholdModel(), path, Preprocessing(spacing=(3.0, 3.0, 3.0)))
    native = read_volume(path)
    assert pred.shape == nib.load(path).shape == native.shape
    again = predict_volume(_ThresholdModel(), native, Preprocessing(spacing=(3.0, 3.0, 3.0)))
    np.testing.assert_array_equal(again.array, pred.array)  # a Volume already read: same map
    np.testing.assert_allclose(pred.affine, native.affine)
    assert set(np.unique(pred.array).tolist()) == {0.0, 1.0}
    truth = native.array > 0  # HU > 0 on the native 1.5 mm grid
    mask = pred.array > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
    flipped = mask[::-1]  # a wrong axis order or flip would score far lower
    assert 2 * (flipped & truth).sum() / (flipped.sum() + truth.sum()) < dice - 0.1
    out = write_volume(pred, tmp_path / "pred.nii.gz", dtype=np.uint8)
    check_same_grid(native, read_label_map(out))


def test_predict_volume_with_a_trained_model(frozen_run, volumes: Path) -> None:
    model, _, _ = frozen_run
    pred = predict_volume(model, volumes / CT, PRE)
    assert pred.shape == (122, 101, 30)
    assert set(np.unique(pred.array).tolist()) <= {0.0, 1.0, 2.0}


def test_save_and_load_round_trip(frozen_run, tmp_path: Path) -> None:
    model, _, _ = frozen_run
    path = save_segmentation_model(model, tmp_path / "seg", PRE)
    loaded, pre = load_segmentation_model(path)
    assert pre == PRE and loaded.roi_size == CROP and loaded.freeze_encoder
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    plain = save_encoder(build_encoder("resconv_tiny"), tmp_path / "plain", PRE)
    with pytest.raises(CheckpointError, match="seg_decoder"):
        load_segmentation_model(plain)


def test_mismatched_grid_names_both_files(volumes: Path) -> None:
    image = volumes / "totalsegmentator/example_ct.nii.gz"  # 112 slices; the label map has 30
    label = volumes / CT_SEG
    with pytest.raises(DataError, match="grid") as info:
        items_from_pairs([(image, label)], PRE)
    assert str(image) in str(info.value) and str(label) in str(info.value)


def test_labels_beyond_num_classes_are_refused_naming_the_item(volumes: Path) -> None:
    items = items_from_pairs([(volumes / CT, volumes / CT_SEG)], PRE)  # raw TotalSegmentator ids
    config = SegDecoderConfig(num_classes=3)
    with pytest.raises(ValueError, match=r"example_ct_sm\.nii\.gz: labels run from 0 to 117"):
        train_segmentation(build_encoder("resconv_tiny"), items, None, config, CROP, steps=1)


def test_seg_item_refuses_different_grids() -> None:
    with pytest.raises(ValueError, match=r"case-7: image grid \(4, 4, 4\) differs"):
        SegItem(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 5, dtype=torch.long), "case-7")


def test_select_structures_renumbers_and_drops_the_rest() -> None:
    label = torch.tensor([0, 5, 1, 7, 5, 1])
    assert select_structures(label, [5, 1]).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="distinct"):
        select_structures(label, [5, 5])


def test_config_round_trip_and_checks() -> None:
    config = SegDecoderConfig(num_classes=4, width=16, freeze_encoder=False, lr=3e-4)
    assert SegDecoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown segmentation decoder config keys"):
        SegDecoderConfig.from_dict({"classes": 3})
    with pytest.raises(ValueError, match="num_classes"):
        SegDecoderConfig(num_classes=1)
    with pytest.raises(ValueError, match="overlap"):
        SegDecoderConfig(overlap=1.0)


def test_medsegbench_items_train_and_evaluate(medsegbench_root: Path) -> None:
    tmp_path = medsegbench_root
    train = MedSegBench("busi", "train", root=tmp_path)
    items = medsegbench_items(train)
    test_items = medsegbench_items(MedSegBench("busi", "test", root=tmp_path))
    assert items[0].image.shape == (1, 16, 128, 128) and items[0].label.shape == (1, 16, 128, 128)
    assert set(items[0].label.unique().tolist()) == {0, 1}
    torch.manual_seed(0)
    config = SegDecoderConfig(num_classes=train.n_classes, width=8)
    model, history = train_segmentation(
        build_encoder("resconv_tiny"), items, test_items[:1], config, (16, 64, 64), steps=2
    )
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert len(history["val"]) == 1
    result = evaluate_segmentation(model, test_items, ["lesion"])
    assert result["n_items"] == 2 and 0.0 <= result["dice"]["lesion"] <= 1.0
