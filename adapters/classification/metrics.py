"""Labels, splits and metrics shared by every probe and end-to-end baseline.

The task follows from the targets (:func:`task_of`):

* ``binary``: ``(N,)``/``(N, 1)`` labels of two classes; AUC of the second class's probability.
* ``multi-class``: ``(N,)``/``(N, 1)`` labels of ``C > 2`` classes (MedMNIST's ``multi-class`` and
  ``ordinal-regression`` sets, e.g. RetinaMNIST's five grades); AUC is the macro mean of the ``C``
  one-vs-rest AUCs, ACC that of the argmax class. This is what ``medmnist.evaluator``'s
  ``getAUC`` / ``getACC`` compute for both task names (https://arxiv.org/abs/2110.14795); the AUC
  is NaN when the evaluated labels miss a class, as the evaluator's is.
* ``multi-label``: ``(N, L)`` 0/1 indicators; mean per-label AUC, ACC at threshold 0.5 (the
  evaluator's convention).

Test metrics carry bootstrap 95% intervals (:func:`bootstrap_intervals`); hyper-parameters are
picked on the validation split (:func:`best_on_val`, AUC, or ACC where the AUC is undefined).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

MULTILABEL_THRESHOLD = 0.5

Split = tuple[np.ndarray, np.ndarray]
Task = Literal["binary", "multi-class", "multi-label"]
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
        task: ``binary``, ``multi-class`` or ``multi-label`` (:func:`task_of`); empty where the
            maker of the result did not say.
        test_proba: The ``(N_test, C)`` (multi-label: ``(N_test, L)``) test probabilities the
            intervals were computed from (for a trained head: the seed average), columns
            ordered as the sorted training classes; e.g. for ``medmnist.evaluator``.
    """

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    seed_metrics: list[dict[str, float]] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)
    task: str = ""
    test_proba: np.ndarray | None = field(default=None, repr=False)


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


def task_of(y: np.ndarray, classes: np.ndarray) -> Task:
    """The task of targets ``y`` over ``classes``, as :func:`classification_metrics` scores it.

    Args:
        y: ``(N,)`` / ``(N, 1)`` single-label or ``(N, L > 1)`` multi-label targets.
        classes: ``(C,)`` class values (``(L,)`` label indices for multi-label targets).

    Returns:
        ``multi-label`` for ``(N, L > 1)`` targets, else ``binary`` for two classes and
        ``multi-class`` for more.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return "multi-label"
    return "binary" if len(classes) <= 2 else "multi-class"


# ------------------------------------------------------------------------------------- metrics


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, classes: np.ndarray
) -> dict[str, float]:
    """ACC, AUC, macro-F1 and balanced accuracy, by the task of the targets (:func:`task_of`).

    Args:
        y: ``(N,)`` true labels, or ``(N, L)`` 0/1 multi-label targets.
        proba: ``(N, C)`` predicted class probabilities, columns ordered as ``classes``; for
            multi-label targets ``(N, L)`` independent probabilities of each label.
        classes: ``(C,)`` the class values; ``(L,)`` label indices for multi-label targets.

    Returns:
        The four metrics. AUC is NaN when ``y`` holds a single class (for every label), and for
        a multi-class task when ``y`` misses any class of ``classes``.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    task = task_of(y, classes)
    if task == "multi-label":
        return _multilabel_metrics(y, np.asarray(proba))
    if task == "multi-class":
        return _multiclass_metrics(y, np.asarray(proba), np.asarray(classes))
    pred = classes[np.argmax(proba, axis=1)]
    out = {
        "acc": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro", labels=classes, zero_division=0)),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
    }
    present = np.unique(y)
    if len(present) < 2 or len(classes) < 2:
        out["auc"] = float("nan")
    else:
        out["auc"] = float(roc_auc_score(y, proba[:, 1]))
    return out


def _rank_auc(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(K,)`` AUC of each column of ``scores`` ``(N, K)`` for the 0/1 targets ``pos``.

    The Mann-Whitney statistic on average ranks, which equals ``roc_auc_score`` (ties count one
    half); NaN or infinite where a column has no positives or no negatives (call under
    ``np.errstate``).
    """
    n_pos = pos.sum(0)
    n_neg = len(pos) - n_pos
    ranks = rankdata(scores, axis=0)
    return ((ranks * pos).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _multiclass_metrics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Metrics of ``(N,)`` labels over ``C > 2`` classes and ``(N, C)`` probabilities.

    Equal to ``medmnist.evaluator.getAUC`` / ``getACC`` (task ``multi-class`` or
    ``ordinal-regression``) when ``classes`` is ``0..C-1``: AUC the mean over all ``C`` columns
    of the one-vs-rest AUC (NaN if ``y`` misses a class), ACC that of the argmax. F1 is macro
    over ``classes`` (0 for a class never true nor predicted), balanced accuracy the mean recall
    of the classes present in ``y``; both as scikit-learn computes them. Vectorised, for the
    bootstrap.
    """
    if proba.shape != (len(y), len(classes)):
        raise ValueError(
            f"multi-class proba must be (N, C) = ({len(y)}, {len(classes)}), got {proba.shape}"
        )
    col = np.searchsorted(classes, y)  # (N,) column of each label
    if not np.array_equal(classes[np.minimum(col, len(classes) - 1)], y):
        raise ValueError(
            f"labels {np.setdiff1d(y, classes).tolist()} are not in {classes.tolist()}"
        )
    cols = np.arange(len(classes))
    true = col[:, None] == cols  # (N, C) one-hot of the label
    pred = np.argmax(proba, axis=1)[:, None] == cols  # (N, C) one-hot of the argmax
    tp = (true & pred).sum(0)
    n_true, n_pred = true.sum(0), pred.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = _rank_auc(true, proba)
        recall = tp[n_true > 0] / n_true[n_true > 0]
        f1 = np.where(n_true + n_pred > 0, 2 * tp / np.maximum(n_true + n_pred, 1), 0.0)
    return {
        "acc": float(tp.sum() / len(y)),
        "f1": float(f1.mean()),
        "balanced_acc": float(recall.mean()),
        "auc": float(auc.mean()) if ((n_true > 0) & (n_true < len(y))).all() else float("nan"),
    }


def _multilabel_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Per-label metrics of ``(N, L)`` targets, averaged over labels (vectorised for the bootstrap).

    The AUC is :func:`_rank_auc`'s; a label with no positives or no negatives is left out of
    its mean.
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
        auc = _rank_auc(pos, proba)
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
        task=task_of(yte, classes),
        test_proba=proba,
    )
