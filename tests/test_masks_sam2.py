"""The SAM2 mask provider (omnienc.pretext.masks.sam2) with a tiny random-weight SAM2.

No SAM2 weights exist on the test machines: a SAM2 video checkpoint with the smallest sizes the
architecture allows is built and saved here, so the tests check the protocol and shapes (seed
slices, propagation both ways, masks on the input grid, NMS, the wiring), not mask quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.errors import CheckpointError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.masks import MASK_PROVIDERS, MaskConfig, body_mask, propose_masks
from omnienc.pretext.masks import sam2 as ms
from omnienc.transforms import preprocess_volume

CT_IMAGE = "totalsegmentator/example_ct_sm.nii.gz"
SIZE = 64  # SAM2 input side of the tiny model (1024 in the real ones)
# Fast enough on one CPU thread: 2 seed slices, one mask each, a 2 x 2 point grid.
FAST = ms.Sam2MaskConfig(
    seed_interval=24,
    points_per_side=2,
    pred_iou_thresh=-100.0,  # random weights: keep whatever the decoder proposes
    stability_score_thresh=0.0,
    min_pixels=1,
    max_masks_per_slice=1,
)


def tiny_sam2_config():
    """A ``Sam2VideoConfig`` of about 1M parameters with a 64 x 64 input.

    The memory attention's image cross-attention takes 64 channels (fixed in transformers), so
    the memory has 64 channels and the hidden size is larger (128), as in the real models.
    """
    from transformers import Sam2VideoConfig

    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 8,
        "image_size": [SIZE, SIZE],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [8, 16, 32, 64],
        "num_attention_heads_per_stage": [1, 1, 1, 1],
        "window_size_per_stage": [4, 4, 4, 4],
        "global_attention_blocks": [3],  # not a stage's first block (those pool queries)
        "window_positional_embedding_background_size": [2, 2],
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [64, 32, 16, 8],
        "backbone_feature_sizes": [[SIZE // s, SIZE // s] for s in (4, 8, 16)],
        "fpn_hidden_size": 128,
    }
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 128, "image_size": SIZE, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 128,
            "mlp_dim": 32,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
        image_size=SIZE,
        num_maskmem=3,
        memory_attention_hidden_size=128,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32,
        memory_attention_rope_feat_sizes=[SIZE // 16, SIZE // 16],
        memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=32,
        max_object_pointers_in_encoder=4,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Sam2VideoModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam2") / "tiny-sam2"
    Sam2VideoModel(tiny_sam2_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ct_crop(volumes: Path) -> np.ndarray:
    """``example_ct_sm`` after the standard preprocessing (2 mm), padded/cropped to 48^3."""
    volume = read_volume(volumes / CT_IMAGE)
    image = preprocess_volume(volume, Preprocessing(spatial_size=(48, 48, 48)))["image"][0]
    return np.asarray(image, dtype=np.float32)


def test_seed_slices_step_through_the_body_along_the_axis():
    body = np.zeros((10, 12, 40), dtype=bool)
    body[2:8, 3:9, 5:28] = True  # body on axial slices 5..27
    assert ms.seed_slices(body, axis=2, interval=8) == [8, 16, 24]  # centred: 8 - 5 == 27 - 24
    assert ms.seed_slices(body, axis=0, interval=4) == [2, 6]  # X: 2..7
    assert ms.seed_slices(np.zeros((4, 4, 4), dtype=bool), axis=2, interval=2) == []


def test_windows_are_uint8_rgb_per_modality(ct_crop: np.ndarray):
    body = body_mask(ct_crop)
    rgb = ms.window_rgb(ct_crop, body, ms.Sam2MaskConfig())  # [0, 1] image: CT windows
    assert rgb.shape == (*ct_crop.shape, 3) and rgb.dtype == np.uint8
    soft, lung, bone = (rgb[..., c][body].astype(float) for c in range(3))
    assert lung.mean() > soft.mean() > bone.mean()  # a wide lung window brightens most tissue
    mr = (ct_crop - ct_crop.mean()) / ct_crop.std()  # z-scored: negatives, percentile windows
    rgb = ms.window_rgb(mr, body, ms.Sam2MaskConfig())
    assert rgb.dtype == np.uint8 and rgb[..., 0][body].max() == 255


def test_nms_3d_drops_a_duplicated_mask():
    a = np.zeros((2, 8, 8, 8), dtype=bool)
    a[0, :4] = True
    a[1, 4:] = True
    masks = np.concatenate([a, a[:1]])  # mask 2 duplicates mask 0
    assert ms.nms_3d(masks, np.array([0.9, 0.5, 0.8]), iou=0.7) == [0, 1]
    assert ms.nms_3d(masks, np.array([0.1, 0.5, 0.8]), iou=0.7) == [2, 1]


def test_protocol_seeds_propagation_and_shapes(checkpoint: Path, ct_crop: np.ndarray):
    models = ms.load_sam2(str(checkpoint), "cpu")
    assert models.device == torch.device("cpu")
    body = body_mask(ct_crop)
    result = ms.sam2_volume_masks(ct_crop, body, models, FAST)
    depth = ct_crop.shape[2]
    assert result.seeds == ms.seed_slices(body, 2, FAST.seed_interval) and len(result.seeds) == 2
    for seed in result.seeds:
        forward = [f for s, f, rev in result.visited if s == seed and not rev]
        backward = [f for s, f, rev in result.visited if s == seed and rev]
        assert forward == list(range(seed, depth))  # every slice after the seed, in order
        assert backward == list(range(seed, -1, -1))  # and every slice before it
    masks = result.masks
    assert masks.dtype == bool and masks.ndim == 4 and masks.shape[1:] == ct_crop.shape
    assert 1 <= len(masks) <= 2 and len(result.scores) == len(masks)
    assert all(m.any() for m in masks)


def test_missing_folder_unknown_id_and_other_models_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    missing = tmp_path / "no-such-sam2"
    with pytest.raises(CheckpointError, match="no such SAM2 checkpoint folder") as err:
        ms.load_sam2(str(missing))
    assert str(missing) in str(err.value) and "--sam2" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache") as err:
        ms.load_sam2("omnienc-tests/not-a-cached-sam2")
    assert "omnienc-tests/not-a-cached-sam2" in str(err.value)
    assert "facebook/sam2.1-hiera-tiny" in str(err.value)  # says what to pass
    from transformers import GPT2Config

    other = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=1).save_pretrained(other)
    with pytest.raises(CheckpointError, match="'gpt2' model, not a SAM2 video") as err:
        ms.load_sam2(str(other))
    assert str(other) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"not a folder with a config\.json"):
        ms.load_sam2(str(tmp_path / "empty"))


def test_provider_needs_a_checkpoint(ct_crop: np.ndarray):
    with pytest.raises(ValueError, match="--sam2"):
        MASK_PROVIDERS["sam2"](ct_crop, body_mask(ct_crop), MaskConfig(providers=("sam2",)))


def test_cli_sam2_option_selects_the_provider(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import omnienc.data.folder
    import omnienc.pretext.masks
    from omnienc.cli import main

    seen: list[MaskConfig] = []

    class NoVolumes:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.entries: list[object] = []

    def capture(folder: object, config: MaskConfig, *args: object, **kwargs: object) -> list:
        seen.append(config)
        return []

    monkeypatch.setattr(omnienc.data.folder, "VolumeFolder", NoVolumes)
    monkeypatch.setattr(omnienc.pretext.masks, "compute_folder_masks", capture)
    argv = ["masks", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "-q"]
    assert main([*argv, "--sam2", "facebook/sam2.1-hiera-tiny"]) == 0
    assert main(argv) == 0
    assert seen[0].providers == ("sam2",) and seen[0].sam2 == "facebook/sam2.1-hiera-tiny"
    assert seen[1] == MaskConfig()  # without --sam2: the classical default


def test_propose_masks_through_the_providers_dict(
    checkpoint: Path, ct_crop: np.ndarray, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ms, "DEFAULT_CONFIG", FAST)
    config = MaskConfig(providers=("sam2",), sam2=str(checkpoint), min_voxels=1)
    masks = propose_masks(ct_crop, config)
    assert masks.dtype == bool and masks.shape[1:] == ct_crop.shape and len(masks) <= 2
