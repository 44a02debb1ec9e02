"""The dense label-transfer diagnostic: its descriptors, its bank, the transfer, a tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_fewshot_bench import CHECKPOINT, two_ct_crops

from omnienc.adapters.segmentation import WindowFeatures
from omnienc.benchmarks.fewshot_knn import (
    BASELINES,
    K,
    knn_markdown,
    main,
    run_knn,
    support_bank,
    token_descriptors,
    transfer_labels,
)
from omnienc.encoders import random_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_descriptors_are_unit_vectors_of_every_scale_on_one_grid():
    feats = [torch.randn(2, c, s, s, s) for c, s in ((4, 16), (8, 8), (16, 4))]
    desc = token_descriptors(feats, scale=1)
    assert desc.shape == (2, 28, 8, 8, 8)
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(2, 8, 8, 8))
    # Each scale weighs the same: its unit part is 1/sqrt(3) of the descriptor's length.
    part = desc[:, 4:12].norm(dim=1)
    torch.testing.assert_close(part, torch.full_like(part, 3**-0.5))
    with pytest.raises(ValueError, match="scale 3"):
        token_descriptors(feats, scale=3)


@pytest.fixture(scope="module")
def ct_crop(volumes: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 40x40x24 crop of the real CT (intensities scaled to about [-1, 1]) and its liver."""
    import nibabel as nib

    img = nib.load(volumes / "totalsegmentator" / "example_ct_sm.nii.gz").get_fdata()
    seg = nib.load(volumes / "totalsegmentator" / "example_seg.nii.gz").get_fdata()
    box = (slice(30, 70), slice(30, 70), slice(4, 28))
    image = np.clip(img[box], -200, 300).astype(np.float32) / 250.0
    return image, seg[box] == 5


def test_a_scan_transfers_its_own_labels_to_itself(ct_crop):
    image, liver = ct_crop
    assert 2_000 < liver.sum() < image.size - 2_000
    enc = random_encoder("resconv_tiny", 0).eval()
    windows = WindowFeatures(enc, image, (32, 32, 32), overlap=0.25)
    bank = support_bank(windows, [liver, ~liver], ["liver", "rest"])
    assert bank.tokens.shape[0] == bank.labels.shape[0] and bank.names == ["liver", "rest"]
    total = bank.labels.sum(dim=1)  # 1 in the volume, 0 in the padding (4 + 4 of 32 slices)
    assert torch.all(torch.minimum(total, (total - 1).abs()) < 1e-5)
    assert float((total > 0.5).float().mean()) == pytest.approx(24 / 32)
    maps = transfer_labels(windows, bank, k=1)
    assert maps.shape == (2, *image.shape) and maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.sum(axis=0).max() <= 1.0 + 1e-4  # shares of a partition (and of padding)
    np.testing.assert_allclose(maps[..., 6:18].sum(axis=0), 1.0, atol=1e-4)  # away from it
    pred = maps[0] > 0.5
    dice = 2 * (pred & liver).sum() / (pred.sum() + liver.sum())
    assert dice > 0.8, dice  # each token finds itself; what is lost is the 4-voxel token grid
    with pytest.raises(ValueError, match="1 masks for 2"):
        support_bank(windows, [liver], ["liver", "rest"])


def test_the_padding_of_a_small_volume_matches_monais_windows(ct_crop):
    image, _ = ct_crop  # 24 slices under a 32-voxel window: padded 4 before and 4 after
    enc = random_encoder("resconv_tiny", 0).eval()
    windows = WindowFeatures(enc, image, (32, 32, 32), overlap=0.25)
    assert windows.padding() == (4, 4, 0, 0, 0, 0) and windows.shape == image.shape
    boxes = [box for box, _ in windows.per_window()]
    assert len(boxes) == windows.windows
    for box in boxes:
        assert tuple(s.stop - s.start for s in box) == (32, 32, 32)
        assert box[2] == slice(0, 32)


@pytest.fixture(scope="module")
def tiny_knn(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    tmp = tmp_path_factory.mktemp("knn")
    catalogue = two_ct_crops(volumes, tmp)
    return run_knn(
        str(CHECKPOINT),
        tmp,
        catalogue=catalogue,
        min_voxels=200,
        progress=False,
        methods=["prototype", "prototype_random", "intensity"],
    )


def test_tiny_run_scores_the_transfer_beside_the_baselines(tiny_knn: dict):
    p = tiny_knn
    assert p["rows"] and all(r["group"] == "CT" for r in p["rows"])
    assert p["variants"] == ["knn", "knn_random", "prototype", "prototype_random", "intensity"]
    for row in p["rows"]:
        assert set(row["dice"]) == set(p["variants"]), row["structure"]
        assert all(0.0 <= d <= 1.0 for d in row["dice"].values())
    assert p["constants"]["k"] == K
    assert p["seconds_per_query"]["knn"] > 0 and p["seconds_per_query"]["knn_random"] > 0
    assert set(p["paired"]["CT"]) == {f"knn - {v}" for v in p["variants"][1:]}
    text = knn_markdown({**p, "command": "python -m omnienc.benchmarks.fewshot_knn"})
    assert "| CT |" in text and "knn_random" in text


def test_main_refuses_a_random_encoder_and_a_missing_checkpoint(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--encoder", "random:resconv_tiny", "--out", str(tmp_path / "out"), "--quick"])
    assert exc.value.code == 2 and "random-init floor runs too" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--encoder", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "nothing" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    assert set(BASELINES) >= {"prototype", "registration"}
