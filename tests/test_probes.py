"""Probes on frozen features of real MedMNIST cubes: kNN, multi-label metrics and linear probe,
trained heads (attention pooling, MLP), and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from omnienc.adapters.classification import (
    AttentionPoolHead,
    FeatureSet,
    MLPHead,
    bootstrap_intervals,
    classification_metrics,
    extract_features,
    knn_probe,
    linear_probe,
    random_checkpoint_id,
    train_head_probe,
)
from omnienc.data.medmnist import MedMNIST
from omnienc.encoders import build_encoder

# Rows of AdrenalMNIST3D 28^3 per split: enough for every probe, small enough for a CPU test.
ROWS = {"train": 240, "val": 98, "test": 120}
KEYS = {"acc", "auc", "f1", "balanced_acc"}


# Tiny heads train several times faster on one thread than on two busy ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def real(data_root: Path) -> dict[str, FeatureSet]:
    """Random-init resconv_tiny features and maps of real AdrenalMNIST3D cubes.

    ``labels`` is multi-label ``(N, 2)``: the adrenal label, and whether the shape mask is larger
    than the median of the training masks (a label the cubes decide, so probes can learn it).
    """
    root = data_root / "medmnist"
    with np.load(root / "adrenalmnist3d.npz") as z:
        volumes = {s: z[f"{s}_images"][:n].sum(axis=(1, 2, 3)) for s, n in ROWS.items()}
    median = np.median(volumes["train"])
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    out = {}
    for split, n in ROWS.items():
        ds = MedMNIST("adrenalmnist3d", split, root=root, indices=range(n))
        fs = extract_features(
            encoder,
            ds,
            checkpoint_id=random_checkpoint_id("resconv_tiny", 0),
            maps=True,
            batch_size=60,
            progress=False,
        )
        assert fs.labels is not None
        fs.labels = np.stack([fs.labels, (volumes[split] > median).astype(np.int64)], axis=1)
        out[split] = fs
    return out


def _splits(
    real: dict[str, FeatureSet], column: int | None = None, maps: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(features or maps, labels)`` per split; ``column`` picks one label (single-label)."""
    out = []
    for split in ROWS:
        fs = real[split]
        assert fs.labels is not None and fs.maps is not None
        y = fs.labels if column is None else fs.labels[:, column]
        out.append((fs.maps if maps else fs.features, y))
    return out


def _shifted(
    real: dict[str, FeatureSet], scale: float, maps: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real features (or maps) shifted along one random channel direction where the adrenal
    label is 1: separable data whose noise is the real features'."""
    direction = np.random.default_rng(1).normal(size=real["train"].features.shape[1])
    direction *= scale * real["train"].features.std() / np.linalg.norm(direction)
    shift = direction.reshape(-1, 1, 1, 1) if maps else direction  # (E,) or (E, 1, 1, 1)
    return [
        (x + y.reshape(-1, *[1] * (x.ndim - 1)) * shift, y)
        for x, y in _splits(real, column=0, maps=maps)
    ]


def _naive_knn_val_aucs(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], ks: list[int]
) -> list[float]:
    """Centred cosine kNN with 1 / (1 - cos) votes, written out, for a binary label."""
    mean = train[0].mean(axis=0)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cos = unit(val[0]) @ unit(train[0]).T  # (N_val, N_train)
    order = np.argsort(-cos, axis=1, kind="stable")
    aucs = []
    for k in ks:
        votes = np.zeros(len(val[0]))
        totals = np.zeros(len(val[0]))
        for i in range(len(val[0])):
            for j in order[i, :k]:
                w = 1.0 / max(1.0 - cos[i, j], 1e-12)
                votes[i] += w * train[1][j]
                totals[i] += w
        aucs.append(roc_auc_score(val[1], votes / totals))
    return aucs


def test_knn_picks_k_on_validation_and_beats_chance(real: dict[str, FeatureSet]) -> None:
    train, val, test = _shifted(real, scale=2.5)
    ks = (1, 3, 5, 10, 20, 50)
    result = knn_probe(train, val, test, ks=ks, n_boot=100)
    aucs = _naive_knn_val_aucs(train, val, list(ks))
    assert result.params["k"] == ks[int(np.argmax(aucs))]
    assert result.params["val_auc"] == pytest.approx(max(aucs), abs=1e-9)
    assert result.metrics["auc"] > 0.9 and set(result.metrics) == KEYS
    lo, hi = result.intervals["auc"]
    assert lo <= result.metrics["auc"] <= hi
    assert result.n == ROWS and result.seed_metrics == [] and result.spread == {}


def test_knn_multilabel_and_k_bounds(real: dict[str, FeatureSet]) -> None:
    train, val, test = _splits(real)
    result = knn_probe(train, val, test, ks=(5, 10, 1000), n_boot=50)
    assert result.params["k"] in (5, 10) and np.isfinite(result.metrics["auc"])
    with pytest.raises(ValueError, match="no k in"):
        knn_probe(train, val, test, ks=(1000,))


def test_multilabel_metrics_against_a_hand_computation() -> None:
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    proba = np.array(
        [[0.9, 0.2, 0.6], [0.5, 0.1, 0.4], [0.4, 0.8, 0.7], [0.2, 0.3, 0.9], [0.6, 0.6, 0.2]]
    )
    m = classification_metrics(y, proba, np.arange(3))
    # Predictions at proba > 0.5 (0.5 itself is negative, as in MedMNIST's evaluator):
    # label 0: [1, 0, 0, 0, 1] vs [1, 0, 1, 0, 0] -> 3/5 right; TP 1, FP 1, FN 1
    # label 1: [0, 0, 1, 0, 1] vs [0, 0, 1, 1, 0] -> 3/5 right; TP 1, FP 1, FN 1
    # label 2: [1, 0, 1, 1, 0] vs [1, 1, 1, 1, 1] -> 3/5 right; TP 3, FP 0, FN 2
    assert m["acc"] == pytest.approx((3 / 5 + 3 / 5 + 3 / 5) / 3)
    assert m["f1"] == pytest.approx((2 / 4 + 2 / 4 + 6 / 8) / 3)
    # Balanced accuracy: label 0 (1/2 + 2/3) / 2, label 1 (1/2 + 2/3) / 2, label 2 only
    # positives, so its recall 3/5 alone.
    assert m["balanced_acc"] == pytest.approx(((1 / 2 + 2 / 3) / 2 * 2 + 3 / 5) / 3)
    # AUC: label 0 positives {0.9, 0.4} vs negatives {0.5, 0.2, 0.6}: pairs won 3 + 1 of 6;
    # label 1 positives {0.8, 0.3} vs {0.2, 0.1, 0.6}: 3 + 2 of 6; label 2 has no negatives.
    assert m["auc"] == pytest.approx((4 / 6 + 5 / 6) / 2)

    # The same against scikit-learn, label by label, on random data with ties.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 4))
    proba = rng.integers(0, 5, (60, 4)) / 4  # ties, and exact 0.5 values
    m = classification_metrics(y, proba, np.arange(4))
    pred = (proba > 0.5).astype(int)
    assert m["auc"] == pytest.approx(
        np.mean([roc_auc_score(y[:, i], proba[:, i]) for i in range(4)])
    )
    assert m["acc"] == pytest.approx(
        np.mean([accuracy_score(y[:, i], pred[:, i]) for i in range(4)])
    )
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["balanced_acc"] == pytest.approx(
        np.mean([balanced_accuracy_score(y[:, i], pred[:, i]) for i in range(4)])
    )


def test_single_label_metrics_keep_their_meaning() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = rng.random(50)
    proba = np.stack([1 - p1, p1], axis=1)
    classes = np.array([0, 1])
    m = classification_metrics(y, proba, classes)
    assert m == classification_metrics(y[:, None], proba, classes)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["acc"] == pytest.approx(accuracy_score(y, (p1 > 0.5).astype(int)))
    lo, hi = bootstrap_intervals(y, proba, classes, n_boot=200)["auc"]
    assert lo < m["auc"] < hi


def test_linear_probe_multilabel(real: dict[str, FeatureSet]) -> None:
    train, val, test = _splits(real)
    result = linear_probe(train, val, test, cs=(0.01, 1.0), n_boot=100)
    assert set(result.metrics) == KEYS and result.n == ROWS
    assert result.params["C"] in (0.01, 1.0)
    # Both labels are in the cubes, and random conv features see them (if dimly: instance
    # normalisation hides much of the mask size): the mean of the per-label AUCs beats chance.
    per_label = [
        linear_probe(*_splits(real, column=i), cs=(0.01, 1.0), n_boot=10).metrics["auc"]
        for i in (0, 1)
    ]
    assert result.metrics["auc"] == pytest.approx(np.mean(per_label), abs=0.05)
    assert result.metrics["auc"] > 0.6


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_heads_train_for_three_seeds_and_report_mean_and_spread(
    real: dict[str, FeatureSet], kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    train, val, test = _shifted(real, scale=2.5, maps=True)
    result = train_head_probe(
        train, val, test, kind=kind, seeds=(0, 1, 2), max_epochs=15, patience=5, n_boot=100
    )
    assert list(tmp_path.iterdir()) == []  # no logs or checkpoints written
    assert [r["seed"] for r in result.seed_metrics] == [0, 1, 2]
    for key in KEYS:
        per_seed = [r[key] for r in result.seed_metrics]
        assert result.metrics[key] == pytest.approx(np.mean(per_seed))
        assert result.spread[key] == pytest.approx(np.std(per_seed, ddof=1))
    assert len({r["auc"] for r in result.seed_metrics}) > 1  # the seeds really differ
    assert result.metrics["auc"] > 0.9
    ensemble = result.params["ensemble_metrics"]
    lo, hi = result.intervals["auc"]
    assert lo <= ensemble["auc"] <= hi
    assert result.params["kind"] == kind and result.n == ROWS


def test_head_runs_are_deterministic_and_take_multilabel(real: dict[str, FeatureSet]) -> None:
    train, val, test = _splits(real, maps=True)
    runs = [
        train_head_probe(train, val, test, kind="attention", seeds=(4,), max_epochs=3, n_boot=10)
        for _ in range(2)
    ]
    assert runs[0].metrics == runs[1].metrics
    assert runs[0].spread == dict.fromkeys(KEYS, 0.0)
    assert np.isfinite(runs[0].metrics["auc"])
    pooled = [(x.mean(axis=(2, 3, 4)), y) for x, y in (train, val, test)]
    mlp = train_head_probe(*pooled, kind="mlp", seeds=(0,), max_epochs=3, n_boot=10)
    assert set(mlp.metrics) == KEYS


def test_head_modules_check_their_input() -> None:
    head = AttentionPoolHead(64, 3)
    assert head(torch.zeros(2, 64, 2, 3, 1)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(B, 64, d, h, w\)"):
        head(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="does not divide"):
        AttentionPoolHead(66, 2, num_heads=4)
    assert MLPHead(8, 2)(torch.zeros(5, 8)).shape == (5, 2)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        MLPHead(8, 2)(torch.zeros(5, 8, 1, 1, 1))


def test_bad_inputs_are_clear_errors(real: dict[str, FeatureSet]) -> None:
    train, val, test = _splits(real, column=0)
    x, y = train
    with pytest.raises(ValueError, match="train: 240 feature rows but 239 labels"):
        linear_probe((x, y[:-1]), val, test)
    with pytest.raises(ValueError, match=r"got shape \(240, 2, 1\)"):
        knn_probe((x, np.zeros((240, 2, 1), np.int64)), val, test)
    with pytest.raises(ValueError, match="single class"):
        linear_probe((x, np.ones_like(y)), val, test)
    with pytest.raises(ValueError, match="single value"):
        linear_probe((x, np.stack([y, np.zeros_like(y)], 1)), *_splits(real)[1:])
    with pytest.raises(ValueError, match=r"test labels \[7\] never occur in train"):
        linear_probe(train, val, (test[0], np.full_like(test[1], 7)))
    with pytest.raises(ValueError, match="do not match train features"):
        knn_probe(train, (val[0][:, :10], val[1]), test)
    with pytest.raises(ValueError, match="NaN"):
        linear_probe((np.full_like(x, np.nan), y), val, test)
    with pytest.raises(ValueError, match="0/1 indicators"):
        linear_probe((x, np.stack([y, 2 * y], 1)), *_splits(real)[1:])
    with pytest.raises(ValueError, match="5 dimensions"):
        train_head_probe(train, val, test, kind="attention")
    with pytest.raises(ValueError, match="unknown head kind"):
        train_head_probe(train, val, test, kind="transformer")
    with pytest.raises(ValueError, match="lr > 0"):
        train_head_probe(train, val, test, kind="mlp", lr=0.0)
