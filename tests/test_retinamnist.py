"""RetinaMNIST (RGB fundus images, five ordinal grades) as a multi-class set: the data, our
metrics against medmnist's own evaluator on real predictions, every probe and baseline with
five classes, the command line, and bad files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from medmnist.evaluator import Evaluator, getACC, getAUC
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from omnienc.adapters.classification import (
    FeatureSet,
    FinetuneConfig,
    ProbeResult,
    bootstrap_intervals,
    classification_metrics,
    extract_features,
    knn_probe,
    linear_probe,
    random_checkpoint_id,
    task_of,
    train_classifier,
    train_head_probe,
)
from omnienc.benchmarks.classification import run_classification
from omnienc.benchmarks.classification_report import format_markdown
from omnienc.cli import main
from omnienc.data.medmnist import MedMNIST
from omnienc.encoders import build_encoder, random_encoder
from omnienc.errors import DataError

FLAG = "retinamnist"
COUNTS = {"train": 1080, "val": 120, "test": 400}  # medmnist INFO
# Rows per split for the probes: every grade occurs in each (grade 4 is 6% of the set).
ROWS = {"train": 360, "val": 120, "test": 200}
TASKS = ("ordinal-regression", "multi-class")  # the evaluator scores both the same way


@pytest.fixture(scope="module")
def root(data_root: Path) -> Path:
    folder = data_root / "medmnist"
    if not (folder / f"{FLAG}.npz").is_file():
        pytest.skip(f"real {FLAG}.npz not in {folder}")
    return folder


# Tiny heads train several times faster on one thread than on two busy ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def feats(root: Path) -> dict[str, FeatureSet]:
    """Random-init resconv_tiny features and maps of the first ROWS rows of each split."""
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    out = {}
    for split, n in ROWS.items():
        ds = MedMNIST(FLAG, split, root=root, indices=range(n))
        assert set(np.unique(ds.labels)) == set(range(5)), split
        out[split] = extract_features(
            encoder,
            ds,
            checkpoint_id=random_checkpoint_id("resconv_tiny", 0),
            maps=True,
            batch_size=120,
            progress=False,
        )
    return out


def _splits(feats: dict[str, FeatureSet], maps: bool = False) -> list[tuple[Any, Any]]:
    """``(features or maps, labels)`` of train, val and test."""
    out = []
    for split in ROWS:
        x = feats[split].maps if maps else feats[split].features
        out.append((x, feats[split].labels))
    return out


def _assert_matches_evaluator(
    y: np.ndarray, result: ProbeResult, metrics: dict[str, float]
) -> None:
    """Our AUC and ACC equal medmnist.evaluator's on the same test probabilities."""
    proba = result.test_proba
    assert proba is not None and proba.shape == (len(y), 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    for task in TASKS:
        assert metrics["auc"] == pytest.approx(getAUC(y[:, None], proba, task), abs=1e-6)
        assert metrics["acc"] == pytest.approx(getACC(y[:, None], proba, task), abs=1e-6)


# ------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_splits_are_lifted_luminance_with_five_grades(root: Path, split: str) -> None:
    ds = MedMNIST(FLAG, split, root=root)
    assert len(ds) == COUNTS[split] and not ds.is_3d
    assert (ds.task, ds.n_classes) == ("ordinal-regression", 5)
    assert ds.labels.shape == (COUNTS[split], 1) and ds.labels.dtype == np.int64
    assert set(np.unique(ds.labels)) == set(range(5))
    with np.load(root / f"{FLAG}.npz") as z:
        raw = z[f"{split}_images"][5].astype(np.float32) / 255  # (28, 28, 3)
    image = ds[5]["image"]
    assert image.shape == (1, 16, 28, 28) and image.dtype == torch.float32
    assert torch.equal(image, image[:, :1].expand_as(image))  # depth replication
    luma = raw @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, omnienc.lifting
    torch.testing.assert_close(image[0, 0], torch.from_numpy(luma).clamp(0, 1))


# ---------------------------------------------------------------------------------- metrics


def test_multiclass_metrics_equal_sklearn_and_the_evaluator_with_ties() -> None:
    rng = np.random.default_rng(0)
    classes = np.arange(5)
    for n in (7, 60, 400):
        y = rng.integers(0, 5, n)
        y[:5] = classes  # every class present
        proba = rng.integers(0, 4, (n, 5)) + 0.5  # many ties, argmax ties too
        proba /= proba.sum(axis=1, keepdims=True)
        m = classification_metrics(y, proba, classes)
        assert m == classification_metrics(y[:, None], proba, classes)
        pred = np.argmax(proba, axis=1)
        assert m["auc"] == pytest.approx(
            roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
        )
        assert m["f1"] == pytest.approx(
            f1_score(y, pred, average="macro", labels=classes, zero_division=0), abs=1e-12
        )
        assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        for task in TASKS:
            assert m["auc"] == pytest.approx(getAUC(y[:, None], proba, task), abs=1e-12)
            assert m["acc"] == pytest.approx(getACC(y[:, None], proba, task), abs=1e-12)


def test_a_missing_grade_has_no_auc_and_the_bootstrap_skips_it() -> None:
    rng = np.random.default_rng(1)
    classes = np.arange(5)
    y = np.repeat(classes, [40, 40, 40, 40, 2])  # grade 4: two items
    proba = rng.dirichlet(np.ones(5), size=len(y))
    assert task_of(y, classes) == "multi-class" and task_of(y[:2], np.arange(2)) == "binary"
    m = classification_metrics(y[y < 4], proba[y < 4], classes)
    assert np.isnan(m["auc"]) and np.isfinite(m["acc"])  # as the evaluator's macro mean
    # Resamples without grade 4 (about 1 in 7) have no AUC; the interval is of the others.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing warns about the undefined ones
        lo, hi = bootstrap_intervals(y, proba, classes, n_boot=200)["auc"]
    assert 0.0 < lo <= classification_metrics(y, proba, classes)["auc"] <= hi < 1.0
    with pytest.raises(ValueError, match=r"labels \[7\] are not in"):
        classification_metrics(np.array([0, 7, 1]), proba[:3], classes)
    with pytest.raises(ValueError, match=r"must be \(N, C\) = \(3, 5\)"):
        classification_metrics(np.array([0, 2, 1]), proba[:3, :4], classes)


def test_evaluator_on_the_whole_test_split(root: Path) -> None:
    """medmnist's Evaluator, reading the labels from the file itself, agrees with us."""
    splits = []
    for split in ("train", "val", "test"):
        ds = MedMNIST(FLAG, split, root=root)
        images = torch.stack([ds[i]["image"][:, 0] for i in range(len(ds))])  # (N, 1, 28, 28)
        pooled = torch.nn.functional.avg_pool2d(images, 4).flatten(1)  # (N, 49) luminance
        splits.append((pooled.numpy(), ds.labels))
    result = linear_probe(*splits, cs=(0.01, 0.1, 1.0), n_boot=20)
    assert result.task == "multi-class" and result.test_proba is not None
    auc, acc = Evaluator(FLAG, "test", root=str(root)).evaluate(result.test_proba)
    assert result.metrics["auc"] == pytest.approx(auc, abs=1e-6)
    assert result.metrics["acc"] == pytest.approx(acc, abs=1e-6)
    assert auc > 0.6  # raw luminance already tells grades apart a little


# ----------------------------------------------------------------------------------- probes


def test_linear_and_knn_probes_match_the_evaluator(feats: dict[str, FeatureSet]) -> None:
    y = feats["test"].labels
    assert y is not None and y.shape == (ROWS["test"],)
    for probe in (linear_probe, knn_probe):
        result = probe(*_splits(feats), n_boot=100)
        assert result.task == "multi-class" and result.n == ROWS
        _assert_matches_evaluator(y, result, result.metrics)
        lo, hi = result.intervals["auc"]
        assert lo <= result.metrics["auc"] <= hi
        assert 0.5 < result.metrics["auc"] < 1.0


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_heads_train_on_five_classes(feats: dict[str, FeatureSet], kind: str) -> None:
    result = train_head_probe(
        *_splits(feats, maps=True), kind=kind, seeds=(0, 1), max_epochs=4, patience=2, n_boot=50
    )
    y = feats["test"].labels
    assert y is not None
    assert result.task == "multi-class" and len(result.seed_metrics) == 2
    _assert_matches_evaluator(y, result, result.params["ensemble_metrics"])


def test_end_to_end_training_on_five_classes(root: Path) -> None:
    ds = {s: MedMNIST(FLAG, s, root=root, indices=range(n)) for s, n in ROWS.items()}
    result = train_classifier(
        random_encoder("resconv_tiny", 0),
        ds["train"],
        ds["val"],
        ds["test"],
        FinetuneConfig(steps=4, eval_every=2, batch_size=16),
        n_boot=50,
    )
    assert result.task == "multi-class"
    _assert_matches_evaluator(ds["test"].labels[:, 0], result, result.metrics)


# ------------------------------------------------------------------------ command line, bench


def test_cli_probe_and_embed(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = str(root.parent)
    out = tmp_path / "probe.json"
    args = ["probe", "--random", "resconv_tiny", "--dataset", FLAG, "--size", "28", "-q"]
    assert main([*args, "--json", str(out), "--data", data]) == 0
    assert "linear probe, retinamnist 28" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"].values()
    assert result["n"] == COUNTS and 0.5 < result["metrics"]["auc"] <= 1.0

    emb = tmp_path / "e.npz"
    spec = f"medmnist:{FLAG}:28:test"
    assert (
        main(["embed", "--random", "resconv_tiny", spec, "-o", str(emb), "-q", "--data", data]) == 0
    )
    with np.load(emb) as z:
        assert z["features"].shape == (400, 64) and np.isfinite(z["features"]).all()
        assert z["labels"].shape == (400, 1) and set(np.unique(z["labels"])) == set(range(5))
        assert z["ids"][3] == "retinamnist:28:test:0003"


def test_bench_classification_reports_a_multiclass_table(root: Path) -> None:
    payload = run_classification(
        FLAG,
        28,
        "random:resconv_tiny",
        medmnist_root=root,
        fractions=(0.01, 1.0),
        methods=("linear", "knn"),
        progress=False,
        log=lambda line: None,
    )
    assert (payload["task"], payload["n_classes"], payload["n"]) == (
        "ordinal-regression",
        5,
        COUNTS,
    )
    # 1% of each grade, at least one: 486, 128, 206, 194, 66 -> 5, 1, 2, 2, 1
    assert payload["train_label_counts"]["0.01"] == {"0": 5, "1": 1, "2": 2, "3": 2, "4": 1}
    assert [(r["method"], r["n_train"]) for r in payload["rows"]] == [
        ("linear", 11),
        ("knn", 11),
        ("linear", 1080),
        ("knn", 1080),
    ]
    for r in payload["rows"]:
        assert 0.0 <= r["metrics"]["auc"] <= 1.0 and r["intervals"]["auc"][0] <= r["metrics"]["auc"]
    text = format_markdown([payload], "omnienc bench classification --dataset retinamnist")
    assert "ordinal-regression, 5 classes, scored as multi-class" in text
    assert "ResNet-50 (224) | 0.716 | 0.511" in text


# -------------------------------------------------------------------------------- bad files


def _write(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savez(path, test_images=images, test_labels=labels)
    return path


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        (np.array([[0], [5]], np.uint8), r"values \[5\] outside 0\.\.4 \(5 classes"),
        (np.array([[0], [-1]], np.int64), r"values \[-1\] outside 0\.\.4"),
        (np.zeros((2, 5), np.uint8), r"shape \(2, 5\); a ordinal-regression set .* \(N, 1\)"),
        (np.array([[0.5], [1.0]]), "must be integers"),
        (np.zeros((3, 1), np.uint8), "2 images but 3 labels"),
    ],
)
def test_bad_labels_name_the_file(tmp_path: Path, labels: np.ndarray, problem: str) -> None:
    path = _write(tmp_path, f"{FLAG}.npz", np.zeros((2, 28, 28, 3), np.uint8), labels)
    with pytest.raises(DataError, match=problem) as err:
        MedMNIST(FLAG, "test", root=tmp_path)
    assert str(path) in str(err.value)


def test_rgb_where_grey_is_expected_and_the_reverse(tmp_path: Path) -> None:
    labels = np.zeros((2, 1), np.uint8)
    path = _write(tmp_path, "breastmnist.npz", np.zeros((2, 28, 28, 3), np.uint8), labels)
    rgb_in_grey = r"holds RGB images \(2, 28, 28, 3\), but breastmnist is greyscale"
    with pytest.raises(DataError, match=rgb_in_grey) as err:
        MedMNIST("breastmnist", "test", root=tmp_path)
    assert str(path) in str(err.value)
    path = _write(tmp_path, f"{FLAG}.npz", np.zeros((2, 28, 28), np.uint8), labels)
    with pytest.raises(DataError, match=r"holds greyscale images .* but retinamnist is RGB") as err:
        MedMNIST(FLAG, "test", root=tmp_path)
    assert str(path) in str(err.value)
