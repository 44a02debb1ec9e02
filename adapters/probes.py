"""Probes on frozen features: a linear probe (logistic regression) with bootstrap intervals.

The linear probe standardises features with training statistics, fits scikit-learn's
``LogisticRegression`` for each regularisation strength ``C`` on a grid, picks ``C`` by the
validation AUC, and reports ACC, AUC (one-vs-rest macro for several classes), macro-F1 and
balanced accuracy on the test split, each with a bootstrap 95% interval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))


@dataclass
class ProbeResult:
    """Test metrics of one probe.

    Attributes:
        metrics: ``acc``, ``auc``, ``f1`` (macro), ``balanced_acc`` on the test split.
        intervals: Bootstrap 95% interval ``(low, high)`` of each metric.
        params: What was chosen on the validation split (e.g. ``C``) and its validation AUC.
        n: Sizes of the train / val / test splits.
    """

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"the linear probe takes single-label targets (N,) or (N, 1), got shape {y.shape}"
        )
    return y.astype(np.int64)


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, classes: np.ndarray
) -> dict[str, float]:
    """ACC, AUC, macro-F1 and balanced accuracy.

    Args:
        y: ``(N,)`` true labels.
        proba: ``(N, C)`` predicted class probabilities, columns ordered as ``classes``.
        classes: ``(C,)`` the class values.

    Returns:
        The four metrics; AUC is NaN when ``y`` holds a single class.
    """
    pred = classes[np.argmax(proba, axis=1)]
    out = {
        "acc": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro", labels=classes, zero_division=0)),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
    }
    present = np.unique(y)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif len(classes) == 2:
        out["auc"] = float(roc_auc_score(y, proba[:, 1]))
    else:
        out["auc"] = float(
            roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
        )
    return out


def bootstrap_intervals(
    y: np.ndarray,
    proba: np.ndarray,
    classes: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap 95% intervals of :func:`classification_metrics` over test items."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in classification_metrics(y[idx], proba[idx], classes).items():
            samples.setdefault(k, []).append(v)
    return {
        k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
        for k, v in samples.items()
    }


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    cs: tuple[float, ...] = DEFAULT_CS,
    seed: int = 0,
    n_boot: int = 1000,
) -> ProbeResult:
    """Logistic regression on standardised frozen features, ``C`` chosen on validation AUC.

    Args:
        train: ``(features (N, E), labels (N,) or (N, 1))``; likewise ``val`` and ``test``.
        cs: Inverse regularisation strengths to try.
        seed: Seed of the solver and the bootstrap.
        n_boot: Bootstrap resamples for the intervals.

    Returns:
        The :class:`ProbeResult` on the test split.
    """
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    ytr, yva, yte = _labels(ytr), _labels(yva), _labels(yte)
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in cs:
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xtr, ytr)
        score = classification_metrics(yva, model.predict_proba(xva), model.classes_)
        key = score["auc"] if np.isfinite(score["auc"]) else score["acc"]
        if best is None or key > best[0]:
            best = (key, c, model)
    assert best is not None
    val_score, c, model = best
    proba = model.predict_proba(xte)
    return ProbeResult(
        metrics=classification_metrics(yte, proba, model.classes_),
        intervals=bootstrap_intervals(yte, proba, model.classes_, n_boot=n_boot, seed=seed),
        params={"C": c, "val_auc": val_score},
        n={"train": len(ytr), "val": len(yva), "test": len(yte)},
    )


def run_linear_probe(
    encoder: Any,
    flag: str,
    size: int,
    medmnist_root: Any,
    batch_size: int = 64,
    seed: int = 0,
    download: bool = False,
    progress: bool = True,
) -> ProbeResult:
    """Frozen features of a MedMNIST set's three splits -> :func:`linear_probe`.

    Args:
        encoder: A frozen omnienc encoder (put in eval mode).
        flag: MedMNIST flag, e.g. ``adrenalmnist3d``.
        size: Image size flag (28, 64, ...).
        medmnist_root: Folder with the ``.npz`` files.
        batch_size: Feature-extraction batch size.
        seed: Probe and bootstrap seed.
        download: Let the medmnist package download missing files.
        progress: Show progress bars.

    Returns:
        Test metrics of the probe.
    """
    from omnienc.embed import embed_inputs
    from omnienc.preprocessing import Preprocessing

    splits = {}
    for split in ("train", "val", "test"):
        emb = embed_inputs(
            encoder,
            Preprocessing(),
            [f"medmnist:{flag}:{size}:{split}"],
            medmnist_root=medmnist_root,
            batch_size=batch_size,
            download=download,
            progress=progress,
        )
        assert emb.labels is not None
        splits[split] = (emb.features, emb.labels)
    return linear_probe(splits["train"], splits["val"], splits["test"], seed=seed)
