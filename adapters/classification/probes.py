"""Probes on frozen features: linear, kNN, and trained heads (attention pooling, MLP).

Every probe takes ``(features, labels)`` for the train, val and test splits, picks what it tunes
on the validation split (AUC, or ACC where the validation AUC is undefined), and reports ACC,
AUC, macro-F1 and balanced accuracy on the test split, each with a bootstrap 95% interval.

The task follows from the labels (:func:`~omnienc.adapters.classification.metrics.task_of`):

* ``(N,)`` or ``(N, 1)``: single-label. Two classes are binary (AUC of the second class's
  probability); more are multi-class: AUC the macro mean of the one-vs-rest AUCs, ACC that of
  the argmax class, exactly as ``medmnist.evaluator`` scores its ``multi-class`` and
  ``ordinal-regression`` sets. Ordinal labels (RetinaMNIST's five grades) are treated as
  multi-class, as the evaluator does.
* ``(N, L)`` with ``L > 1``: multi-label binary indicators (ChestMNIST). Probabilities are one
  independent column per label; AUC is the mean of the per-label AUCs, ACC the mean per-label
  accuracy at threshold 0.5 (``proba > 0.5``, the convention of MedMNIST's evaluator,
  https://arxiv.org/abs/2110.14795), F1 the macro mean over labels, balanced accuracy the mean
  per-label balanced accuracy. A label whose evaluation split holds one value has no AUC and is
  left out of the mean.

Probes:

* :func:`linear_probe`: logistic regression on standardised features (multinomial for
  multi-class, one binary regression per label for multi-label), ``C`` from a grid.
* :func:`knn_probe`: cosine kNN, ``k`` from a grid. Features are centred on the training mean and
  L2-normalised first (SimpleShot's "CL2N", https://arxiv.org/abs/1911.04623): frozen features of
  a ReLU-family encoder share a large common component that otherwise dominates every cosine.
  Neighbours vote with weight ``1 / cosine distance``, which gives graded probabilities for the
  AUC where uniform votes of a few neighbours give a handful of ties.
* :func:`~omnienc.adapters.classification.heads.train_head_probe` (its own module): an attention
  pooling head over the frozen token map or an MLP head over pooled features, trained with
  Lightning for several seeds; the reported metrics are the mean over seeds with their spread.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from omnienc.adapters.classification.metrics import (
    ProbeResult,
    best_on_val,
    check_splits,
    test_result,
)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
DEFAULT_KS = (1, 3, 5, 10, 20, 50)

# -------------------------------------------------------------------------- linear and kNN


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    cs: tuple[float, ...] = DEFAULT_CS,
    seed: int = 0,
    n_boot: int = 1000,
) -> ProbeResult:
    """Logistic regression on standardised frozen features, ``C`` chosen on validation AUC.

    More than two classes get one multinomial (softmax) regression, scikit-learn's default for
    the lbfgs solver; multi-label targets get one binary logistic regression per label
    (one-vs-rest), all with the same ``C``.

    Args:
        train: ``(features (N, E), labels (N,), (N, 1) or (N, L))``; likewise ``val`` and
            ``test``.
        cs: Inverse regularisation strengths to try.
        seed: Seed of the solver and the bootstrap.
        n_boot: Bootstrap resamples for the intervals.

    Returns:
        The :class:`ProbeResult` on the test split.

    Raises:
        ValueError: Mismatched lengths or widths, labels of a bad shape, or a single class in
            train.
    """
    splits, classes = check_splits((train, val, test), feature_ndims=(2,))
    (xtr, ytr), (xva, yva), (xte, _) = splits
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)

    def fit(c: float) -> tuple[Any, np.ndarray]:
        model: Any = LogisticRegression(C=c, max_iter=5000, random_state=seed)
        if ytr.ndim == 2:
            model = OneVsRestClassifier(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xtr, ytr)
        return model, model.predict_proba(xva)

    c, val_score, model = best_on_val(cs, fit, yva, classes)
    params = {"C": c, "val_auc": val_score}
    return test_result(splits, model.predict_proba(xte), classes, params, seed, n_boot)


def _centred_unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows of ``x - mean`` scaled to unit L2 norm (zero rows stay zero)."""
    x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn_proba(model: KNeighborsClassifier, x: np.ndarray) -> np.ndarray:
    """``(N, C)`` class probabilities, or ``(N, L)`` positive probabilities for multi-label."""
    proba = model.predict_proba(x)
    if isinstance(proba, list):  # multi-output: one (N, 2) array per label, columns [0, 1]
        return np.stack([p[:, 1] for p in proba], axis=1)
    return np.asarray(proba)


def knn_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    ks: tuple[int, ...] = DEFAULT_KS,
    seed: int = 0,
    n_boot: int = 1000,
    center: bool = True,
) -> ProbeResult:
    """Distance-weighted cosine kNN on frozen features, ``k`` chosen on validation AUC.

    Features are centred on the training mean (unless ``center=False``) and L2-normalised;
    neighbours vote with weight ``1 / (1 - cos)``. Multi-label targets get one vote per label
    from the same neighbours.

    Args:
        train: ``(features (N, E), labels (N,), (N, 1) or (N, L))``; likewise ``val`` and
            ``test``.
        ks: Neighbour counts to try; those above the training size are skipped.
        seed: Seed of the bootstrap (the kNN itself is deterministic).
        n_boot: Bootstrap resamples for the intervals.
        center: Subtract the training mean before normalising.

    Returns:
        The :class:`ProbeResult` on the test split; ``params`` holds ``k``.

    Raises:
        ValueError: As :func:`linear_probe`, or no ``k`` fits the training size.
    """
    splits, classes = check_splits((train, val, test), feature_ndims=(2,))
    (xtr, ytr), (xva, yva), (xte, _) = splits
    mean = xtr.mean(axis=0) if center else np.zeros(xtr.shape[1])
    xtr, xva, xte = (_centred_unit(x, mean) for x in (xtr, xva, xte))
    grid = sorted({int(k) for k in ks if 1 <= k <= len(xtr)})
    if not grid:
        raise ValueError(f"no k in {ks} fits a training split of {len(xtr)} items")

    def fit(k: int) -> tuple[KNeighborsClassifier, np.ndarray]:
        model = KNeighborsClassifier(
            n_neighbors=k, weights="distance", metric="cosine", algorithm="brute"
        ).fit(xtr, ytr)
        return model, _knn_proba(model, xva)

    k, val_score, model = best_on_val(grid, fit, yva, classes)
    params = {"k": k, "val_auc": val_score, "metric": "cosine", "weights": "distance"}
    return test_result(splits, _knn_proba(model, xte), classes, params, seed, n_boot)


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
