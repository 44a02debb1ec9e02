"""Labels, splits and metrics shared by every probe and end-to-end baseline.

Targets follow from the label shape (:func:`as_targets`): ``(N,)``/``(N, 1)`` single-label
(binary or multi-class, one-vs-rest macro AUC) or ``(N, L)`` multi-label indicators (mean
per-label AUC; ACC at threshold 0.5, the MedMNIST evaluator's convention). Test metrics carry
bootstrap 95% intervals (:func:`bootstrap_intervals`); hyper-parameters are picked on the
validation split (:func:`best_on_val`, AUC, or ACC where the AUC is undefined).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

MULTILABEL_THRESHOLD = 0.5

Split = tuple[np.ndarray, np.ndarray]
P = TypeVar("P")
M = TypeVar("M")


@dataclass
class ProbeResult:
    """Test metrics of one probe.

    Attributes:
        metrics: ``acc``, ``auc``, ``f1`` (macro), ``balanced_acc`` on the test split (for a
            trained head: the mean over seeds).
        intervals: Bootstrap 95% interval ``(low, high)`` of each metric (for a trained head: of
            the seed-averaged probabilities).
        params: What was chosen on the validation split (e.g. ``C``, ``k``) and its validation
            AUC (``val_auc``; ACC where the AUC is undefined).
        n: Sizes of the train / val / test splits.
        seed_metrics: Per-seed test metrics of a trained head (empty for linear and kNN).
        spread: Standard deviation over seeds of each metric (empty for linear and kNN).
    """

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    seed_metrics: list[dict[str, float]] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- labels and splits


def as_targets(y: Any, name: str = "labels") -> np.ndarray:
    """``(N,)`` single-label or ``(N, L > 1)`` multi-label targets as int64.

    Raises:
        ValueError: Another shape, non-integer labels, or multi-label values other than 0/1.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(
            f"{name} must be (N,) or (N, 1) single-label, or (N, L) multi-label targets, "
            f"got shape {y.shape}"
        )
    if y.dtype.kind not in "biu" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
        raise ValueError(f"{name} must be integer class labels, got {y.dtype} values")
    y = y.astype(np.int64)
    if y.ndim == 2 and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}: multi-label targets (N, L) must be 0/1 indicators")
    return y


def check_splits(
    splits: Sequence[tuple[Any, Any]], feature_ndims: tuple[int, ...]
) -> tuple[list[Split], np.ndarray]:
    """Validate train / val / test ``(features, labels)`` pairs.

    Args:
        splits: The three pairs.
        feature_ndims: Allowed ``ndim`` of the features (2 for ``(N, E)``, 5 for maps).

    Returns:
        The pairs as arrays (labels through :func:`as_targets`) and the classes: the sorted class
        values of the training labels, or ``arange(L)`` for multi-label targets.
    """
    out: list[Split] = []
    for name, pair in zip(("train", "val", "test"), splits, strict=True):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"{name} must be a (features, labels) pair")
        x, y = np.asarray(pair[0]), as_targets(pair[1], f"{name} labels")
        if x.ndim not in feature_ndims:
            raise ValueError(
                f"{name} features must have {' or '.join(map(str, feature_ndims))} dimensions "
                f"((N, E) features or (N, E, d, h, w) maps), got shape {x.shape}"
            )
        if len(x) != len(y):
            raise ValueError(f"{name}: {len(x)} feature rows but {len(y)} labels")
        if len(x) == 0:
            raise ValueError(f"{name}: the split is empty")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or infinite values")
        out.append((x, y))
    (xtr, ytr), *rest = out
    for name, (x, y) in zip(("val", "test"), rest, strict=True):
        if x.ndim != xtr.ndim or x.shape[1] != xtr.shape[1]:
            raise ValueError(f"{name} features {x.shape} do not match train features {xtr.shape}")
        if y.shape[1:] != ytr.shape[1:]:
            raise ValueError(f"{name} labels {y.shape} do not match train labels {ytr.shape}")
    if ytr.ndim == 2:
        constant = np.flatnonzero(ytr.min(axis=0) == ytr.max(axis=0))
        if constant.size:
            raise ValueError(
                f"train labels {constant.tolist()[:10]} hold a single value; every label of a "
                "multi-label probe needs positives and negatives in train"
            )
        return out, np.arange(ytr.shape[1])
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError(
            f"train labels hold a single class ({classes.tolist()}); a probe needs at least two"
        )
    for name, (_, y) in zip(("val", "test"), rest, strict=True):
        unseen = np.setdiff1d(y, classes)
        if unseen.size:
            raise ValueError(f"{name} labels {unseen.tolist()} never occur in train")
    return out, classes


def split_sizes(splits: Sequence[Split]) -> dict[str, int]:
    return {name: len(y) for name, (_, y) in zip(("train", "val", "test"), splits, strict=True)}


# ------------------------------------------------------------------------------------- metrics


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, classes: np.ndarray
) -> dict[str, float]:
    """ACC, AUC, macro-F1 and balanced accuracy.

    Args:
        y: ``(N,)`` true labels, or ``(N, L)`` 0/1 multi-label targets.
        proba: ``(N, C)`` predicted class probabilities, columns ordered as ``classes``; for
            multi-label targets ``(N, L)`` independent probabilities of each label.
        classes: ``(C,)`` the class values; ``(L,)`` label indices for multi-label targets.

    Returns:
        The four metrics; AUC is NaN when ``y`` holds a single class (for every label).
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        return _multilabel_metrics(y, np.asarray(proba))
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


def _multilabel_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Per-label metrics of ``(N, L)`` targets, averaged over labels (vectorised for the bootstrap).

    The AUC is the Mann-Whitney statistic on average ranks, which equals ``roc_auc_score``
    (ties count one half).
    """
    if proba.shape != y.shape:
        raise ValueError(
            f"multi-label proba must have the labels' shape {y.shape}, got {proba.shape}"
        )
    pos = y == 1
    pred = proba > MULTILABEL_THRESHOLD
    n_pos, n_neg = pos.sum(0), (~pos).sum(0)
    tp = (pred & pos).sum(0)
    fp = (pred & ~pos).sum(0)
    tn = n_neg - fp
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN columns
        ranks = rankdata(proba, axis=0)
        auc = ((ranks * pos).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        recalls = np.stack([tp / n_pos, tn / n_neg])  # (2, L); NaN where a value is absent
        denom = 2 * tp + fp + (n_pos - tp)
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        return {
            "acc": float((pred == pos).mean(0).mean()),
            "f1": float(f1.mean()),
            "balanced_acc": float(np.nanmean(recalls, axis=0).mean()),
            "auc": float(np.nanmean(np.where((n_pos > 0) & (n_neg > 0), auc, np.nan))),
        }


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


def val_score(metrics: dict[str, float]) -> float:
    """What the validation split ranks by: AUC, or ACC where the AUC is undefined."""
    return metrics["auc"] if np.isfinite(metrics["auc"]) else metrics["acc"]


def best_on_val(
    grid: Iterable[P],
    fit: Callable[[P], tuple[M, np.ndarray]],
    yva: np.ndarray,
    classes: np.ndarray,
) -> tuple[P, float, M]:
    """The grid value whose model scores best on validation (the first one on ties).

    Args:
        grid: Candidate hyper-parameters.
        fit: Fits a model for one candidate and returns it with its validation probabilities.
        yva: Validation labels.
        classes: As for :func:`classification_metrics`.

    Returns:
        ``(value, validation score, model)``.
    """
    best: tuple[P, float, M] | None = None
    for value in grid:
        model, proba = fit(value)
        score = val_score(classification_metrics(yva, proba, classes))
        if best is None or score > best[1]:
            best = (value, score, model)
    if best is None:
        raise ValueError("the hyper-parameter grid is empty")
    return best


def test_result(
    splits: Sequence[Split],
    proba: np.ndarray,
    classes: np.ndarray,
    params: dict[str, Any],
    seed: int,
    n_boot: int,
) -> ProbeResult:
    """Test metrics and bootstrap intervals of the test probabilities ``proba``."""
    yte = splits[2][1]
    return ProbeResult(
        metrics=classification_metrics(yte, proba, classes),
        intervals=bootstrap_intervals(yte, proba, classes, n_boot=n_boot, seed=seed),
        params=params,
        n=split_sizes(splits),
    )
