"""Probes on frozen features: linear, kNN, and trained heads (attention pooling, MLP).

Every probe takes ``(features, labels)`` for the train, val and test splits, picks what it tunes
on the validation split (AUC, or ACC where the validation AUC is undefined), and reports ACC,
AUC, macro-F1 and balanced accuracy on the test split, each with a bootstrap 95% interval.

The task follows from the label shape:

* ``(N,)`` or ``(N, 1)``: single-label. Two classes are binary (AUC of the second class's
  probability); more are multi-class (one-vs-rest macro AUC). Ordinal labels are treated as
  multi-class.
* ``(N, L)`` with ``L > 1``: multi-label binary indicators (ChestMNIST). Probabilities are one
  independent column per label; AUC is the mean of the per-label AUCs, ACC the mean per-label
  accuracy at threshold 0.5 (``proba > 0.5``, the convention of MedMNIST's evaluator,
  https://arxiv.org/abs/2110.14795), F1 the macro mean over labels, balanced accuracy the mean
  per-label balanced accuracy. A label whose evaluation split holds one value has no AUC and is
  left out of the mean.

Probes:

* :func:`linear_probe`: logistic regression on standardised features (one-vs-rest for
  multi-label), ``C`` from a grid.
* :func:`knn_probe`: cosine kNN, ``k`` from a grid. Features are centred on the training mean and
  L2-normalised first (SimpleShot's "CL2N", https://arxiv.org/abs/1911.04623): frozen features of
  a ReLU-family encoder share a large common component that otherwise dominates every cosine.
  Neighbours vote with weight ``1 / cosine distance``, which gives graded probabilities for the
  AUC where uniform votes of a few neighbours give a handful of ties.
* :func:`train_head_probe`: an :class:`AttentionPoolHead` over the frozen token map or an
  :class:`MLPHead` over pooled features, trained with Lightning for several seeds; the reported
  metrics are the mean over seeds with their spread.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
DEFAULT_KS = (1, 3, 5, 10, 20, 50)
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


def _check_splits(
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


def _sizes(splits: Sequence[Split]) -> dict[str, int]:
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


def _val_score(metrics: dict[str, float]) -> float:
    """What the validation split ranks by: AUC, or ACC where the AUC is undefined."""
    return metrics["auc"] if np.isfinite(metrics["auc"]) else metrics["acc"]


def _best_on_val(
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
        score = _val_score(classification_metrics(yva, proba, classes))
        if best is None or score > best[1]:
            best = (value, score, model)
    if best is None:
        raise ValueError("the hyper-parameter grid is empty")
    return best


def _test_result(
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
        n=_sizes(splits),
    )


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

    Multi-label targets get one binary logistic regression per label (one-vs-rest), all with the
    same ``C``.

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
    splits, classes = _check_splits((train, val, test), feature_ndims=(2,))
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

    c, val_score, model = _best_on_val(cs, fit, yva, classes)
    params = {"C": c, "val_auc": val_score}
    return _test_result(splits, model.predict_proba(xte), classes, params, seed, n_boot)


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
    splits, classes = _check_splits((train, val, test), feature_ndims=(2,))
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

    k, val_score, model = _best_on_val(grid, fit, yva, classes)
    params = {"k": k, "val_auc": val_score, "metric": "cosine", "weights": "distance"}
    return _test_result(splits, _knn_proba(model, xte), classes, params, seed, n_boot)


# -------------------------------------------------------------------------------- trained heads


class AttentionPoolHead(nn.Module):
    """One learned query attends over the frozen token map, then LayerNorm + Linear.

    The attentive probe of V-JEPA (https://arxiv.org/abs/2404.08471) and AIM
    (https://arxiv.org/abs/2401.08541), on the ``d * h * w`` tokens of a 3D feature map. The
    tokens carry no position embedding, so the pooling is permutation invariant and any grid
    size works.

    Args:
        embed_dim: Channels ``E`` of the map.
        n_outputs: Logits: classes, or labels for multi-label targets.
        num_heads: Attention heads; must divide ``embed_dim``.
    """

    def __init__(self, embed_dim: int, n_outputs: int, num_heads: int = 4) -> None:
        super().__init__()
        if embed_dim < 1 or n_outputs < 1:
            raise ValueError(f"embed_dim and n_outputs must be >= 1, got {embed_dim}, {n_outputs}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide embed_dim {embed_dim}")
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of token maps.

        Args:
            x: ``(B, E, d, h, w)``.

        Returns:
            ``(B, n_outputs)``.
        """
        if x.ndim != 5 or x.shape[1] != self.embed_dim:
            raise ValueError(
                f"AttentionPoolHead expects (B, {self.embed_dim}, d, h, w) maps, "
                f"got {tuple(x.shape)}"
            )
        tokens = self.norm_tokens(x.flatten(2).transpose(1, 2))  # (B, d*h*w, E)
        query = self.query.expand(len(x), -1, -1)  # (B, 1, E)
        pooled, _ = self.attn(query, tokens, tokens, need_weights=False)  # (B, 1, E)
        return self.fc(self.norm(pooled[:, 0]))


class MLPHead(nn.Module):
    """Two-layer perceptron on pooled features: Linear -> GELU -> Dropout -> Linear.

    Args:
        embed_dim: Feature width ``E``.
        n_outputs: Logits: classes, or labels for multi-label targets.
        hidden: Hidden width.
        dropout: Dropout after the hidden layer.
    """

    def __init__(
        self, embed_dim: int, n_outputs: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if embed_dim < 1 or n_outputs < 1 or hidden < 1:
            raise ValueError(
                f"embed_dim, n_outputs and hidden must be >= 1, got {embed_dim}, {n_outputs}, "
                f"{hidden}"
            )
        self.embed_dim = embed_dim
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of pooled features.

        Args:
            x: ``(B, E)``.

        Returns:
            ``(B, n_outputs)``.
        """
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(
                f"MLPHead expects (B, {self.embed_dim}) features, got {tuple(x.shape)}"
            )
        return self.net(x)


# kind -> (head builder(embed_dim, n_outputs), accepted feature ndims)
HEADS: dict[str, tuple[Callable[[int, int], nn.Module], tuple[int, ...]]] = {
    "attention": (AttentionPoolHead, (5,)),
    "mlp": (MLPHead, (2, 5)),
}


def _logits_to_proba(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    proba = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return proba.float().cpu().numpy()


class HeadProbeModule(pl.LightningModule):
    """Trains a head on frozen features and keeps, in memory, its best state on validation.

    Args:
        head: The head; its outputs are logits.
        multilabel: Binary cross-entropy per label (targets ``(B, L)`` float) instead of cross
            entropy (targets ``(B,)`` class indices).
        yva: Validation labels, as for :func:`classification_metrics`.
        classes: As for :func:`classification_metrics`.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        head: nn.Module,
        multilabel: bool,
        yva: np.ndarray,
        classes: np.ndarray,
        lr: float,
        weight_decay: float,
    ) -> None:
        super().__init__()
        self.head = head
        self.multilabel = multilabel
        self.loss_fn: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
        self.yva, self.classes = yva, classes
        self.lr, self.weight_decay = lr, weight_decay
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self._val_logits: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, target = batch
        loss = self.loss_fn(self.head(x), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite head loss {loss.item()} at epoch {self.current_epoch}"
            )
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._val_logits.append(self.head(batch[0]).detach())

    def on_validation_epoch_end(self) -> None:
        proba = _logits_to_proba(torch.cat(self._val_logits), self.multilabel)
        self._val_logits.clear()
        score = _val_score(classification_metrics(self.yva, proba, self.classes))
        self.log("val_score", score)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@torch.inference_mode()
def _predict(head: nn.Module, x: torch.Tensor, multilabel: bool, batch_size: int) -> np.ndarray:
    head.eval()
    device = next(head.parameters()).device
    logits = [head(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return _logits_to_proba(torch.cat(logits), multilabel)


@contextmanager
def _quiet_lightning(quiet: bool) -> Iterator[None]:
    """Silence Lightning's banners and small-data warnings around one of many short fits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
        levels = [lg.level for lg in loggers]
        if quiet:
            for lg in loggers:
                lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _standardised(splits: Sequence[Split], pool: bool) -> list[torch.Tensor]:
    """Features as float32 tensors, per channel standardised with training statistics.

    With ``pool``, ``(N, E, d, h, w)`` maps are first averaged to ``(N, E)``.
    """
    xs = [x.mean(axis=(2, 3, 4)) if pool and x.ndim == 5 else x for x, _ in splits]
    axes = tuple(i for i in range(xs[0].ndim) if i != 1)  # every axis but the channels
    mean = xs[0].mean(axis=axes, keepdims=True)
    std = xs[0].std(axis=axes, keepdims=True) + 1e-6
    return [torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in xs]


@dataclass(frozen=True)
class HeadTraining:
    """How :func:`train_head_probe` trains each head.

    Attributes:
        max_epochs: Upper bound on epochs per run.
        lr: AdamW learning rate.
        batch_size: Training batch size.
        weight_decay: AdamW weight decay.
        patience: Epochs without a better validation score before stopping.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        progress: Show Lightning's progress bar and messages.
    """

    max_epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    patience: int = 10
    accelerator: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if min(self.max_epochs, self.batch_size, self.patience) < 1 or not self.lr > 0:
            raise ValueError(
                f"need max_epochs, batch_size, patience >= 1 and lr > 0, got {self.max_epochs}, "
                f"{self.batch_size}, {self.patience}, {self.lr}"
            )


def _fit_head(
    module: HeadProbeModule,
    xtr: torch.Tensor,
    target: torch.Tensor,
    xva: torch.Tensor,
    seed: int,
    cfg: HeadTraining,
) -> nn.Module:
    """Train ``module.head`` and return it with its best validation state loaded."""
    with _quiet_lightning(not cfg.progress):
        trainer = pl.Trainer(
            accelerator=cfg.accelerator,
            devices=1,
            max_epochs=cfg.max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=cfg.progress,
            num_sanity_val_steps=0,
            callbacks=[EarlyStopping(monitor="val_score", mode="max", patience=cfg.patience)],
        )
        train_loader = DataLoader(
            TensorDataset(xtr, target),
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        val_loader = DataLoader(TensorDataset(xva), batch_size=max(cfg.batch_size, 256))
        trainer.fit(module, train_loader, val_loader)
    assert module.best_state is not None  # at least one validation epoch ran
    module.head.load_state_dict(module.best_state)
    return module.head


def train_head_probe(
    train_maps: tuple[np.ndarray, np.ndarray],
    val_maps: tuple[np.ndarray, np.ndarray],
    test_maps: tuple[np.ndarray, np.ndarray],
    kind: str = "attention",
    seeds: Sequence[int] = (0, 1, 2),
    max_epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    patience: int = 10,
    n_boot: int = 1000,
    accelerator: str = "cpu",
    progress: bool = False,
) -> ProbeResult:
    """Train a head on frozen features for several seeds; report the mean and spread.

    Features are standardised per channel with training statistics. Each seed trains with
    AdamW under a Lightning ``Trainer`` (no logger, no checkpoint files) until validation stops
    improving for ``patience`` epochs or ``max_epochs`` pass, and keeps the epoch with the best
    validation AUC (in memory). ``pl.seed_everything(seed)`` seeds each run, so a seed gives the
    same result on the same machine; it reseeds the global RNGs.

    Args:
        train_maps: ``(maps (N, E, d, h, w), labels (N,), (N, 1) or (N, L))``; likewise
            ``val_maps`` and ``test_maps``. ``kind="mlp"`` also takes pooled ``(N, E)``
            features (maps are averaged over ``(d, h, w)``).
        kind: A key of :data:`HEADS`: ``attention`` (:class:`AttentionPoolHead`) or ``mlp``
            (:class:`MLPHead`).
        seeds: One training run per seed.
        max_epochs: Upper bound on epochs per run.
        lr: AdamW learning rate.
        batch_size: Training batch size.
        weight_decay: AdamW weight decay.
        patience: Epochs without a better validation score before stopping.
        n_boot: Bootstrap resamples for the intervals.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        progress: Show Lightning's progress bar and messages.

    Returns:
        A :class:`ProbeResult`: ``metrics`` the mean over seeds of the test metrics, ``spread``
        their sample standard deviation (0 for one seed), ``seed_metrics`` each run's test
        metrics with its seed, validation score (``val_auc``) and best epoch, ``intervals`` the
        bootstrap intervals of the seed-averaged test probabilities (whose own metrics are
        ``params["ensemble_metrics"]``).

    Raises:
        ValueError: Unknown ``kind``, bad hyper-parameters, or bad splits as for
            :func:`linear_probe`.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(HEADS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    cfg = HeadTraining(max_epochs, lr, batch_size, weight_decay, patience, accelerator, progress)
    build, ndims = HEADS[kind]
    splits, classes = _check_splits((train_maps, val_maps, test_maps), feature_ndims=ndims)
    (_, ytr), (_, yva), (_, yte) = splits
    multilabel = ytr.ndim == 2
    xtr, xva, xte = _standardised(splits, pool=kind == "mlp")
    target = torch.from_numpy(
        ytr.astype(np.float32) if multilabel else np.searchsorted(classes, ytr)
    )

    runs: list[dict[str, float]] = []
    test_probas: list[np.ndarray] = []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        module = HeadProbeModule(
            build(xtr.shape[1], len(classes)), multilabel, yva, classes, lr, weight_decay
        )
        head = _fit_head(module, xtr, target, xva, seed, cfg)
        test_probas.append(_predict(head, xte, multilabel, max(batch_size, 256)))
        runs.append(
            {
                "seed": seed,
                **classification_metrics(yte, test_probas[-1], classes),
                "val_auc": module.best_score,
                "best_epoch": module.best_epoch,
            }
        )

    keys = ("acc", "auc", "f1", "balanced_acc")
    table = np.array([[run[k] for k in keys] for run in runs])  # (seeds, metrics)
    std = table.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(keys))
    params = {
        "kind": kind,
        "seeds": seeds,
        **{k: v for k, v in vars(cfg).items() if k != "progress"},
        "val_auc": float(np.mean([run["val_auc"] for run in runs])),
    }
    result = _test_result(splits, np.mean(test_probas, axis=0), classes, params, seeds[0], n_boot)
    result.params["ensemble_metrics"] = result.metrics
    result.metrics = dict(zip(keys, table.mean(axis=0).tolist(), strict=True))
    result.spread = dict(zip(keys, std.tolist(), strict=True))
    result.seed_metrics = runs
    return result


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
