"""MedSegBench through the medsegbench package, on tiny files written here.

Real MedSegBench files live only on Zenodo (record 13358372), which these machines cannot
reach, so each test writes a small ``{flag}_128.npz`` in the package's format (keys
``{split}_images`` and ``{split}_label``, uint8 images ``(N, H, W)`` or ``(N, H, W, 3)``,
label maps ``(N, H, W)``) and reads it back through the package's dataset class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.data.medsegbench import MedSegBench
from omnienc.errors import DataError
from omnienc.lifting import LIFT_DEPTH

SIZE = 128


def write_npz(folder: Path, flag: str, rgb: bool, n_labels: int, n: int = 3) -> dict:
    """Write ``{flag}_128.npz`` with ``n`` random items per split; return the arrays."""
    rng = np.random.default_rng(0)
    image_shape = (n, SIZE, SIZE, 3) if rgb else (n, SIZE, SIZE)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, image_shape, dtype=np.uint8)
        arrays[f"{split}_label"] = rng.integers(0, n_labels, (n, SIZE, SIZE), dtype=np.uint8)
    np.savez_compressed(folder / f"{flag}_{SIZE}.npz", **arrays)
    return arrays


def test_grayscale_binary_set(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path, "busi", rgb=False, n_labels=2)
    ds = MedSegBench("busi", "test", root=tmp_path)
    assert len(ds) == 3 and ds.task == "binary" and ds.n_classes == 2
    assert ds.ids == ["busi:128:test:0000", "busi:128:test:0001", "busi:128:test:0002"]
    item = ds[1]
    image, mask = item["image"], item["mask"]
    assert image.shape == (1, LIFT_DEPTH, SIZE, SIZE) and image.dtype == torch.float32
    assert mask.shape == (1, LIFT_DEPTH, SIZE, SIZE) and mask.dtype == torch.int64
    assert 0.0 <= image.min() and image.max() <= 1.0
    raw = torch.from_numpy(arrays["test_images"][1].astype(np.float32) / 255)
    labels = torch.from_numpy(arrays["test_label"][1].astype(np.int64))
    for d in range(LIFT_DEPTH):  # every slice is the stored image / label map
        torch.testing.assert_close(image[0, d], raw)
        assert torch.equal(mask[0, d], labels)


def test_rgb_multiclass_set(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path, "wbc", rgb=True, n_labels=3)
    ds = MedSegBench("wbc", "train", root=tmp_path, indices=[2])
    assert len(ds) == 1 and ds.task == "multi-class" and ds.n_classes == 3
    assert ds.ids == ["wbc:128:train:0002"]
    item = ds[0]
    assert item["image"].shape == (1, LIFT_DEPTH, SIZE, SIZE)
    rgb = arrays["train_images"][2].astype(np.float64) / 255
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # BT.601, as omnienc.lifting documents
    torch.testing.assert_close(
        item["image"][0, 5].double(), torch.from_numpy(luma), atol=1e-6, rtol=0
    )
    assert torch.equal(
        item["mask"][0, 9], torch.from_numpy(arrays["train_label"][2].astype(np.int64))
    )
    assert set(item["mask"].unique().tolist()) == {0, 1, 2}


def test_missing_file_names_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        MedSegBench("busi", "test", root=tmp_path)
    msg = str(err.value)
    assert "busi_128.npz" in msg and str(tmp_path) in msg and "download=True" in msg


def test_missing_size_names_file(tmp_path: Path) -> None:
    write_npz(tmp_path, "busi", rgb=False, n_labels=2)
    with pytest.raises(DataError, match=r"busi_256\.npz not found"):
        MedSegBench("busi", "test", size=256, root=tmp_path)


def test_bad_label_shape_names_key(tmp_path: Path) -> None:
    images = np.zeros((2, SIZE, SIZE), np.uint8)
    np.savez(tmp_path / "busi_128.npz", val_images=images, val_label=np.zeros((2, SIZE), np.uint8))
    with pytest.raises(DataError, match=r"busi_128\.npz: val_label"):
        MedSegBench("busi", "val", root=tmp_path)


def test_unknown_flag_and_size_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown MedSegBench flag 'busy'.*busi"):
        MedSegBench("busy", "test", root=tmp_path)
    with pytest.raises(ValueError, match=r"sizes \[128, 256, 512\], not 28"):
        MedSegBench("busi", "test", size=28, root=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        MedSegBench("busi", "dev", root=tmp_path)
