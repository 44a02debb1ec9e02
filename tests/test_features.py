"""Frozen feature extraction on real MedMNIST data: shapes, ids, labels, maps, cache, files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from omnienc.adapters.classification import (
    FeatureSet,
    checkpoint_id,
    extract_features,
    random_checkpoint_id,
)
from omnienc.data.medmnist import MedMNIST
from omnienc.embed import embed_inputs
from omnienc.encoders import Encoder, build_encoder
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

SPEC = "medmnist:adrenalmnist3d:28:val"
RANDOM_ID = random_checkpoint_id("resconv_tiny", 0)


@pytest.fixture(scope="module")
def medmnist_root(data_root: Path) -> Path:
    return data_root / "medmnist"


@pytest.fixture(scope="module")
def val_npz(medmnist_root: Path) -> dict[str, np.ndarray]:
    with np.load(medmnist_root / "adrenalmnist3d.npz") as z:
        return {"images": z["val_images"], "labels": z["val_labels"]}


def _encoder() -> Encoder:
    torch.manual_seed(0)
    return build_encoder("resconv_tiny")


class _Counting:
    """Counts calls of an encoder's ``forward_features`` (every forward goes through it)."""

    def __init__(self, encoder: Encoder) -> None:
        self.calls = 0
        inner = encoder.forward_features

        def counted(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return inner(x)

        encoder.forward_features = counted  # type: ignore[method-assign]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_dataset_subset_shapes_ids_labels_and_maps(
    medmnist_root: Path, val_npz: dict[str, np.ndarray]
) -> None:
    ds = MedMNIST("adrenalmnist3d", "val", root=medmnist_root, indices=range(40))
    encoder = _encoder()
    fs = extract_features(
        encoder, ds, checkpoint_id=RANDOM_ID, maps=True, batch_size=16, progress=False
    )
    assert len(fs) == 40 and fs.features.shape == (40, encoder.embed_dim)
    assert fs.features.dtype == np.float32 and np.isfinite(fs.features).all()
    assert fs.ids == [f"adrenalmnist3d:28:val:{i:04d}" for i in range(40)]
    assert fs.labels is not None and fs.labels.dtype == np.int64
    np.testing.assert_array_equal(fs.labels, val_npz["labels"][:40, 0])
    assert fs.maps is not None and fs.maps.shape == (40, encoder.embed_dim, 2, 2, 2)
    np.testing.assert_allclose(fs.maps.mean(axis=(2, 3, 4)), fs.features, atol=1e-6)
    assert fs.checkpoint == RANDOM_ID and fs.dataset == repr(ds)
    # Naive reference: the encoder on the raw cubes of the file, scaled to [0, 1].
    cubes = torch.from_numpy(val_npz["images"][:3].astype(np.float32) / 255.0)[:, None]
    with torch.inference_mode():
        expected = encoder.eval()(cubes).numpy()
    np.testing.assert_allclose(fs.features[:3], expected, atol=1e-5)


def test_spec_matches_embed_and_is_cached(
    medmnist_root: Path,
    val_npz: dict[str, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    encoder = _encoder()
    counter = _Counting(encoder)
    kwargs: dict[str, Any] = {
        "checkpoint_id": RANDOM_ID,
        "preprocessing": Preprocessing(),
        "medmnist_root": medmnist_root,
        "cache_dir": tmp_path,
        "progress": False,
    }
    first = extract_features(encoder, SPEC, batch_size=64, **kwargs)
    assert counter.calls == 2  # 98 items in batches of 64
    assert first.dataset == SPEC and first.meta["task"] == "binary-class"
    np.testing.assert_array_equal(first.labels, val_npz["labels"][:, 0])
    assert first.ids[-1] == "adrenalmnist3d:28:val:0097" and first.maps is None
    emb = embed_inputs(encoder, Preprocessing(), [SPEC], medmnist_root=medmnist_root)
    np.testing.assert_allclose(first.features, emb.features, atol=1e-5)
    assert emb.ids == first.ids

    (cache_file,) = (tmp_path / "features").glob("*.npz")
    calls = counter.calls
    hit = extract_features(encoder, SPEC, batch_size=7, **kwargs)  # batch size is not in the key
    assert counter.calls == calls
    np.testing.assert_array_equal(hit.features, first.features)
    np.testing.assert_array_equal(hit.labels, first.labels)
    assert hit.ids == first.ids and hit.checkpoint == RANDOM_ID

    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated by a crash elsewhere
    caplog.set_level(logging.WARNING, logger="omnienc")
    rebuilt = extract_features(encoder, SPEC, batch_size=64, **kwargs)
    assert counter.calls == calls + 2
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(cache_file) in warnings[0]
    np.testing.assert_array_equal(rebuilt.features, first.features)
    assert FeatureSet.load(cache_file).ids == first.ids  # the rebuilt file is whole again


def test_cache_key_separates_weights_and_maps(medmnist_root: Path, tmp_path: Path) -> None:
    ds_rows = 98
    encoder = _encoder()
    counter = _Counting(encoder)
    kwargs: dict[str, Any] = {
        "medmnist_root": medmnist_root,
        "cache_dir": tmp_path,
        "progress": False,
        "batch_size": 128,
    }
    extract_features(encoder, SPEC, checkpoint_id=RANDOM_ID, **kwargs)
    with_maps = extract_features(encoder, SPEC, checkpoint_id=RANDOM_ID, maps=True, **kwargs)
    other = extract_features(encoder, SPEC, checkpoint_id="random:resconv_tiny:1", **kwargs)
    assert counter.calls == 3 and len(list((tmp_path / "features").glob("*.npz"))) == 3
    assert with_maps.maps is not None and with_maps.maps.shape[0] == ds_rows
    assert len(other) == ds_rows


def test_save_load_round_trip_and_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fs = FeatureSet(
        features=rng.normal(size=(5, 4)).astype(np.float32),
        labels=rng.integers(0, 2, (5, 3)),
        ids=[f"item-{i}" for i in range(5)],
        checkpoint="sha256:" + "ab" * 32,
        dataset="medmnist:chestmnist:28:test",
        maps=rng.normal(size=(5, 4, 1, 2, 2)).astype(np.float32),
        meta={"task": "multi-label, binary-class", "note": "ünïcode"},
    )
    loaded = FeatureSet.load(fs.save(tmp_path / "f.npz"))
    np.testing.assert_array_equal(loaded.features, fs.features)
    np.testing.assert_array_equal(loaded.labels, fs.labels)
    np.testing.assert_array_equal(loaded.maps, fs.maps)
    assert (loaded.ids, loaded.checkpoint, loaded.dataset, loaded.meta) == (
        fs.ids,
        fs.checkpoint,
        fs.dataset,
        fs.meta,
    )
    assert list(tmp_path.iterdir()) == [tmp_path / "f.npz"]  # no temporary file left

    sub = loaded.subset([4, 0])
    assert len(sub) == 2 and sub.ids == ["item-4", "item-0"]
    np.testing.assert_array_equal(sub.maps, fs.maps[[4, 0]])
    assert len(loaded.subset(np.array([True, False, True, False, False]))) == 2
    with pytest.raises(IndexError, match="out of range"):
        loaded.subset([5])

    unlabeled = FeatureSet(fs.features, None, fs.ids, "random:vit3d_tiny:0", "folder")
    again = FeatureSet.load(unlabeled.save(tmp_path / "u.npz"))
    assert again.labels is None and again.maps is None


class _Bomb:
    """Records being unpickled."""

    unpickled = False

    def __setstate__(self, state: Any) -> None:
        _Bomb.unpickled = True


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    fs = FeatureSet(np.zeros((1, 2)), None, ["a"], "random:x:0", "d")
    fs.save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["features"] = np.array([_Bomb()], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="pickle") as info:
        FeatureSet.load(path)
    assert info.value.path == path and not _Bomb.unpickled

    raw = tmp_path / "raw.npy"
    np.save(raw, np.array([_Bomb()], dtype=object))
    with pytest.raises(DataError, match="pickle"):
        FeatureSet.load(raw)
    assert not _Bomb.unpickled


def test_load_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        FeatureSet.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(DataError, match="not an omnienc feature file") as info:
        FeatureSet.load(other)
    assert info.value.path == other


def test_checkpoint_ids(tmp_path: Path) -> None:
    import json

    from omnienc.checkpoint import save_encoder

    folder = save_encoder(_encoder(), tmp_path / "enc", Preprocessing())
    sha = json.loads((folder / "config.json").read_text())["weights"]["sha256"]
    assert checkpoint_id(folder) == f"sha256:{sha}"
    assert random_checkpoint_id("resconv_small", 3) == "random:resconv_small:3"


def test_bad_inputs_are_clear_errors(medmnist_root: Path, tmp_path: Path) -> None:
    encoder = _encoder()
    with pytest.raises(ValueError, match="checkpoint_id"):
        extract_features(encoder, SPEC, checkpoint_id="", medmnist_root=medmnist_root)
    with pytest.raises(ValueError, match="bad MedMNIST spec"):
        extract_features(encoder, "medmnist:adrenalmnist3d:28:dev", checkpoint_id=RANDOM_ID)
    with pytest.raises(ValueError, match="medmnist:FLAG:SIZE:SPLIT"):
        extract_features(encoder, "adrenalmnist3d", checkpoint_id=RANDOM_ID)
    with pytest.raises(DataError, match=r"adrenalmnist3d\.npz not found") as info:
        extract_features(encoder, SPEC, checkpoint_id=RANDOM_ID, medmnist_root=tmp_path)
    assert info.value.path == tmp_path / "adrenalmnist3d.npz"
    with pytest.raises(ValueError, match="ids"):
        FeatureSet(np.zeros((2, 3)), None, ["only-one"], "random:x:0", "d")
    with pytest.raises(ValueError, match=r"maps must be \(N, E, d, h, w\)"):
        FeatureSet(np.zeros((2, 3)), None, ["a", "b"], "random:x:0", "d", maps=np.zeros((2, 3)))

    image = torch.zeros(1, 20, 20, 20)
    mixed = [{"image": image, "label": 1}, {"image": image}]
    with pytest.raises(ValueError, match="'label'"):
        extract_features(encoder, mixed, checkpoint_id=RANDOM_ID, progress=False)
    sizes = [{"image": image}, {"image": torch.zeros(1, 20, 20, 24)}]
    with pytest.raises(ValueError, match="batch_size=1"):
        extract_features(encoder, sizes, checkpoint_id=RANDOM_ID, progress=False)
    one_by_one = extract_features(
        encoder,
        sizes,
        checkpoint_id=RANDOM_ID,
        batch_size=1,
        progress=False,
        name="two volumes",
    )
    assert one_by_one.ids == ["0", "1"] and one_by_one.labels is None
    assert one_by_one.dataset == "two volumes"
