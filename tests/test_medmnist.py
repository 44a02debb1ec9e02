"""MedMNIST through the medmnist package, on the real files in ``<data root>/medmnist/``.

The data root is ``$OMNIENC_DATA`` if set, else ``../shared/data``
(:func:`omnienc.data.root.resolve_data_root`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError

COUNTS = {"train": 1188, "val": 98, "test": 298}  # AdrenalMNIST3D, medmnist info.py


@pytest.fixture(scope="module")
def root() -> Path:
    folder = resolve_data_root() / "medmnist"
    for name in ("adrenalmnist3d.npz", "adrenalmnist3d_64.npz", "breastmnist.npz"):
        if not (folder / name).is_file():
            pytest.skip(f"real MedMNIST file {name} not in {folder}")
    return folder


@pytest.fixture(scope="module")
def adrenal_test(root: Path) -> MedMNIST:
    return MedMNIST("adrenalmnist3d", "test", root=root)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_adrenal_splits_have_official_counts_and_shapes(root: Path, split: str) -> None:
    ds = MedMNIST("adrenalmnist3d", split, root=root)
    assert len(ds) == COUNTS[split]
    assert ds.labels.shape == (COUNTS[split], 1) and ds.labels.dtype == np.int64
    assert set(np.unique(ds.labels)) <= {0, 1}
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        assert item["image"].shape == (1, 28, 28, 28) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["label"].shape == (1,) and item["label"].dtype == torch.int64


def test_adrenal_attributes(adrenal_test: MedMNIST) -> None:
    ds = adrenal_test
    assert (ds.flag, ds.split, ds.size, ds.is_3d) == ("adrenalmnist3d", "test", 28, True)
    assert ds.task == "binary-class" and ds.n_classes == 2
    assert ds.class_names == {"0": "normal", "1": "hyperplasia"}
    assert ds.ids[12] == "adrenalmnist3d:28:test:0012"
    assert len(set(ds.ids)) == len(ds)


def test_image_is_raw_array_over_255(root: Path, adrenal_test: MedMNIST) -> None:
    with np.load(root / "adrenalmnist3d.npz") as z:
        raw, labels = z["test_images"][7], z["test_labels"][7]
    item = adrenal_test[7]
    torch.testing.assert_close(item["image"][0], torch.from_numpy(raw.astype(np.float32) / 255))
    assert item["label"].tolist() == labels.tolist()


def test_size_64_test_split(root: Path) -> None:
    ds = MedMNIST("adrenalmnist3d", "test", size=64, root=root)
    assert len(ds) == COUNTS["test"]
    assert ds[0]["image"].shape == (1, 64, 64, 64)
    assert ds.ids[0] == "adrenalmnist3d:64:test:0000"


def test_breastmnist_2d_is_lifted_by_depth_replication(root: Path) -> None:
    ds = MedMNIST("breastmnist", "train", root=root)
    assert len(ds) == 546 and not ds.is_3d and ds.task == "binary-class"
    image = ds[3]["image"]
    assert image.shape == (1, 16, 28, 28) and image.dtype == torch.float32
    assert torch.equal(image, image[:, :1].expand_as(image))  # every slice the same
    with np.load(root / "breastmnist.npz") as z:
        raw = z["train_images"][3]
    torch.testing.assert_close(image[0, 0], torch.from_numpy(raw.astype(np.float32) / 255))


def test_indices_subset_keeps_original_rows(root: Path, adrenal_test: MedMNIST) -> None:
    sub = MedMNIST("adrenalmnist3d", "test", root=root, indices=[12, 3, 297])
    assert len(sub) == 3
    assert sub.ids == [f"adrenalmnist3d:28:test:{i:04d}" for i in (12, 3, 297)]
    assert np.array_equal(sub.labels, adrenal_test.labels[[12, 3, 297]])
    assert torch.equal(sub[0]["image"], adrenal_test[12]["image"])
    with pytest.raises(IndexError, match="298"):
        MedMNIST("adrenalmnist3d", "test", root=root, indices=[0, 298])


def test_default_collate_batches(adrenal_test: MedMNIST) -> None:
    batch = next(iter(DataLoader(adrenal_test, batch_size=4)))
    assert batch["image"].shape == (4, 1, 28, 28, 28)
    assert batch["label"].shape == (4, 1)
    assert batch["id"][3] == "adrenalmnist3d:28:test:0003"


def test_missing_size_names_file_and_folder(root: Path) -> None:
    with pytest.raises(DataError) as err:
        MedMNIST("breastmnist", "train", size=64, root=root)
    msg = str(err.value)
    assert "breastmnist_64.npz" in msg and str(root) in msg and "download=True" in msg


def test_empty_root_names_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        MedMNIST("adrenalmnist3d", "val", root=tmp_path)
    msg = str(err.value)
    assert "adrenalmnist3d.npz" in msg and str(tmp_path) in msg and "copy" in msg


def test_failed_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmnist.dataset

    def no_network(self: object) -> None:
        raise RuntimeError("Automatic download failed!")

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", no_network)
    with pytest.raises(DataError, match=r"breastmnist\.npz could not be downloaded") as err:
        MedMNIST("breastmnist", "test", root=tmp_path / "new", download=True)
    assert str(tmp_path / "new") in str(err.value)


def test_corrupt_file_names_file(tmp_path: Path) -> None:
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"breastmnist\.npz"):
        MedMNIST("breastmnist", "test", root=tmp_path)


def test_file_without_the_split_names_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"breastmnist\.npz.*val"):
        MedMNIST("breastmnist", "val", root=tmp_path)


def test_wrong_image_shape_names_file(tmp_path: Path) -> None:
    images, labels = np.zeros((2, 28, 29), np.uint8), np.zeros((2, 1), np.uint8)
    np.savez(tmp_path / "breastmnist.npz", test_images=images, test_labels=labels)
    with pytest.raises(DataError, match=r"breastmnist\.npz.*\(N, 28, 28\)"):
        MedMNIST("breastmnist", "test", root=tmp_path)


def test_unknown_flag_lists_flags(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown MedMNIST flag 'adrenal3d'.*adrenalmnist3d"):
        MedMNIST("adrenal3d", "test", root=tmp_path)


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        MedMNIST("adrenalmnist3d", "validation", root=tmp_path)


def test_size_not_offered_for_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sizes \[28, 64\], not 128"):
        MedMNIST("adrenalmnist3d", "test", size=128, root=tmp_path)


def test_parse_spec() -> None:
    assert parse_medmnist_spec("medmnist:adrenalmnist3d:28:test") == ("adrenalmnist3d", 28, "test")
    assert parse_medmnist_spec("medmnist:breastmnist:224:val") == ("breastmnist", 224, "val")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("adrenalmnist3d", "expected medmnist:FLAG:SIZE:SPLIT"),
        ("medmnist:adrenalmnist3d:test", "expected medmnist:FLAG:SIZE:SPLIT"),
        ("medseg:adrenalmnist3d:28:test", "expected medmnist:FLAG:SIZE:SPLIT"),
        ("medmnist:adrenalmnist3d:28:test:extra", "expected medmnist:FLAG:SIZE:SPLIT"),
        ("medmnist::28:test", "empty FLAG"),
        ("medmnist:adrenalmnist3d:big:test", "SIZE 'big' is not a number"),
        ("medmnist:adrenalmnist3d:-28:test", "is not a number"),
        ("medmnist:adrenalmnist3d:28:dev", "SPLIT 'dev'"),
    ],
)
def test_parse_spec_rejects_malformed(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        parse_medmnist_spec(spec)
    assert repr(spec) in str(err.value)
