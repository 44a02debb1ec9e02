"""Leave-one-case-out (LOCO) scoring of crop classifiers, and AUC intervals that respect cases.

Every crop gets an out-of-fold score from a model that never saw its case: :func:`loco_folds`
holds out each case in turn and trains on the others. Two kinds of model:

* :func:`probe_loco`: logistic regression on fixed per-crop features (frozen embeddings,
  intensity statistics, ...), standardised; ``C`` is chosen by an inner leave-one-case-out
  cross-validation on the training cases alone (mean inner-fold AUC, the smaller ``C`` on ties),
  then refit on all training cases;
* :func:`scratch_loco`: an encoder trained end-to-end with labels from random init on the
  training cases' crops (a linear layer on its pooled embedding, a fixed budget of AdamW steps,
  random flips), scored once at its last step: nothing is chosen on the held-out case.

:func:`summarise` turns out-of-fold scores into the AUC pooled over all test folds, the AUC of
each fold, and a percentile bootstrap 95% interval that resamples crops within each
(case, class) stratum, so every replicate keeps each case's share and class balance. With four
cases this interval reflects the crop-to-crop noise within these patients, not the spread of a
population of patients (four cases are too few to resample).

The per-crop inputs: :class:`CropItems` feeds crops to
:func:`omnienc.adapters.classification.extract_features`; :func:`intensity_features` are the
intensity-statistics baseline's features.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset

from omnienc.adapters.classification import DEFAULT_CS, Classifier
from omnienc.encoders.base import Encoder
from omnienc.optim import adamw_warmup_cosine, decay_groups

# 1e-4 ... 1e2, a factor 10 apart: every other value of the probes' grid.
PROBE_CS = DEFAULT_CS[::2]


@dataclass(frozen=True)
class ScratchBudget:
    """The fixed budget of the supervised-from-scratch baseline.

    Attributes:
        steps: AdamW steps per fold (the budget).
        batch_size: Crops per step, drawn with replacement from the training cases.
        lr: Peak learning rate (linear warm-up, cosine decay to 0).
        weight_decay: AdamW weight decay of kernels and weight matrices.
        warmup_steps: Linear warm-up steps.
    """

    steps: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size) < 1 or not self.lr > 0:
            raise ValueError(
                f"need steps, batch_size >= 1 and lr > 0, got {self.steps}, "
                f"{self.batch_size}, {self.lr}"
            )


class CropItems(Dataset[dict[str, Any]]):
    """``(N, 1, S0, S1, S2)`` crops as ``{"image", "id"}`` items for feature extraction."""

    def __init__(self, crops: np.ndarray, ids: Sequence[str]) -> None:
        self.crops, self.ids = crops, list(ids)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.crops[i]), "id": self.ids[i]}


INTENSITY_FEATURES = tuple(
    f"{where}_{stat}"
    for where in ("crop", "centre")
    for stat in ("mean", "sd", "p5", "p25", "p50", "p75", "p95")
)


def intensity_features(crops: np.ndarray) -> np.ndarray:
    """Intensity statistics of each crop and of its central cube (a quarter of the crop's side).

    The baseline a researcher tries first: FLAIR tumour and oedema are bright, so statistics of
    the crop, and of the voxels round its centre, say much of what a classifier needs.

    Args:
        crops: ``(N, 1, S0, S1, S2)``.

    Returns:
        ``(N, 14)`` float64, columns named by :data:`INTENSITY_FEATURES`.
    """
    n, _, *size = crops.shape
    # The central cube: side s // 4 (at least 2) round the centre voxel s // 2.
    cube = [slice(s // 2 - max(1, s // 8), s // 2 + max(1, s // 8)) for s in size]
    centre: tuple[Any, ...] = (slice(None), 0, *cube)
    parts = []
    for block in (crops.reshape(n, -1), crops[centre].reshape(n, -1)):
        block = block.astype(np.float64)
        pct = np.percentile(block, (5, 25, 50, 75, 95), axis=1).T
        parts += [block.mean(1, keepdims=True), block.std(1, keepdims=True), pct]
    return np.concatenate(parts, axis=1)


def loco_folds(cases: Sequence[str] | np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Leave-one-case-out folds, one per case in sorted order.

    Args:
        cases: ``(N,)`` the case of every crop.

    Returns:
        ``[(test case, train rows, test rows), ...]``: int64 row indices; the train rows are
        every crop of the other cases.

    Raises:
        ValueError: Fewer than two cases.
    """
    cases = np.asarray(cases)
    names = np.unique(cases)
    if len(names) < 2:
        raise ValueError(f"leave-one-case-out needs at least two cases, got {names.tolist()}")
    return [
        (str(name), np.flatnonzero(cases != name), np.flatnonzero(cases == name)) for name in names
    ]


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Pipeline:
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def choose_c(
    x: np.ndarray, y: np.ndarray, cases: np.ndarray, cs: Sequence[float], seed: int = 0
) -> tuple[float, float]:
    """``C`` by leave-one-case-out cross-validation within the given (training) cases.

    Args:
        x: ``(N, F)`` features of the training cases' crops.
        y: ``(N,)`` 0/1 labels.
        cases: ``(N,)`` their cases (at least two).
        cs: The grid, ascending.
        seed: Solver seed.

    Returns:
        ``(C, mean inner-fold AUC)``; the first (smallest) ``C`` on ties.
    """
    best: tuple[float, float] | None = None
    folds = loco_folds(cases)
    for c in cs:
        aucs = [
            roc_auc_score(y[te], _fit_probe(x[tr], y[tr], c, seed).predict_proba(x[te])[:, 1])
            for _, tr, te in folds
        ]
        score = float(np.mean(aucs))
        if best is None or score > best[1]:
            best = (float(c), score)
    assert best is not None, "the C grid is empty"
    return best


def probe_loco(
    x: np.ndarray,
    y: np.ndarray,
    cases: np.ndarray,
    cs: Sequence[float] = PROBE_CS,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold tumour probabilities of a logistic-regression probe.

    Args:
        x: ``(N, F)`` per-crop features.
        y: ``(N,)`` 0/1 labels.
        cases: ``(N,)`` the case of every crop.
        cs: ``C`` grid of the inner cross-validation. With one value, or a single training case
            (two cases in all), ``C`` is fixed: the grid's middle value.
        seed: Solver seed.

    Returns:
        ``(scores (N,), {test case: {"C", "inner_auc"}})``; ``inner_auc`` is ``None`` where
        ``C`` was fixed.
    """
    scores = np.full(len(y), np.nan)
    params: dict[str, Any] = {}
    for name, tr, te in loco_folds(cases):
        inner: float | None = None
        if len(cs) > 1 and len(np.unique(cases[tr])) > 1:
            c, inner = choose_c(x[tr], y[tr], cases[tr], cs, seed)
        else:
            c = float(cs[len(cs) // 2])
        scores[te] = _fit_probe(x[tr], y[tr], c, seed).predict_proba(x[te])[:, 1]
        params[name] = {"C": c, "inner_auc": None if inner is None else round(inner, 4)}
    return scores, params


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each item of ``(B, C, D, H, W)`` along each spatial axis with probability 1/2."""
    for dim in (2, 3, 4):
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        if flip.any():
            x = x.clone()
            x[flip] = x[flip].flip(dim)
    return x


def train_scratch(
    encoder: Encoder,
    train: tuple[np.ndarray, np.ndarray],
    test_images: np.ndarray,
    budget: ScratchBudget,
    seed: int = 0,
) -> np.ndarray:
    """Train ``encoder`` + a linear layer end-to-end; return the test crops' tumour probability.

    Args:
        encoder: A random-init encoder; trained in place.
        train: ``(images (N, 1, S0, S1, S2) float32, labels (N,) 0/1)``.
        test_images: ``(M, 1, S0, S1, S2)`` float32.
        budget: Steps, batch and optimiser.
        seed: Seeds the head, the batches and the flips.

    Returns:
        ``(M,)`` probabilities of the tumour class after the last step.

    Raises:
        FloatingPointError: The loss stopped being finite.
    """
    torch.manual_seed(seed)
    model = Classifier(encoder, 2)
    groups = decay_groups(model, budget.lr, budget.weight_decay)
    opt = adamw_warmup_cosine(groups, budget.warmup_steps, budget.steps, min_ratio=0.0)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(train[0]), torch.from_numpy(np.asarray(train[1]))
    model.train()
    for step in range(budget.steps):
        rows = torch.randint(len(images), (budget.batch_size,), generator=generator)
        loss = F.cross_entropy(model(_flip(images[rows], generator)), labels[rows])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.inference_mode():
        test = torch.from_numpy(test_images)
        logits = torch.cat([model(test[i : i + 64]) for i in range(0, len(test), 64)])
    return logits.float().softmax(-1)[:, 1].numpy()


def scratch_loco(
    make_encoder: Callable[[], Encoder],
    images: np.ndarray,
    y: np.ndarray,
    cases: np.ndarray,
    budget: ScratchBudget,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold tumour probabilities of the supervised-from-scratch baseline.

    Args:
        make_encoder: Builds a fresh random-init encoder (called once per fold).
        images: ``(N, 1, S0, S1, S2)`` float32 crops.
        y: ``(N,)`` 0/1 labels.
        cases: ``(N,)`` the case of every crop.
        budget: The fixed training budget.
        seed: Seeds each fold's training.

    Returns:
        ``(N,)`` scores.
    """
    scores = np.full(len(y), np.nan)
    for _, tr, te in loco_folds(cases):
        scores[te] = train_scratch(make_encoder(), (images[tr], y[tr]), images[te], budget, seed)
    return scores


def _auc_rows(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores`` ``(B, N)`` against 0/1 ``y`` ``(B, N)``.

    The Mann-Whitney statistic on average ranks (ties count one half), as ``roc_auc_score``.
    """
    pos = y == 1
    n_pos = pos.sum(1)
    n_neg = y.shape[1] - n_pos
    ranks = rankdata(scores, axis=1)
    return ((ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def stratified_bootstrap(
    y: np.ndarray, cases: np.ndarray, n_boot: int, seed: int = 0
) -> np.ndarray:
    """``(n_boot, N)`` resampled row indices, drawn with replacement within each (case, class)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(y)), dtype=np.int64)
    for name in np.unique(cases):
        for label in np.unique(y):
            rows = np.flatnonzero((cases == name) & (y == label))
            out[:, rows] = rows[rng.integers(0, len(rows), (n_boot, len(rows)))]
    return out


def summarise(
    seed_scores: Sequence[np.ndarray],
    y: np.ndarray,
    cases: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pooled and per-fold AUC of out-of-fold scores, for one or several seeds.

    Args:
        seed_scores: ``(N,)`` out-of-fold scores of each seed (one array for a deterministic
            method).
        y: ``(N,)`` 0/1 labels.
        cases: ``(N,)`` the case of every crop.
        n_boot: Bootstrap replicates.
        seed: Bootstrap seed.

    Returns:
        ``{"auc": mean over seeds of the pooled AUC, "interval": its bootstrap 95% interval
        (the same resamples for every seed), "spread": SD over seeds (``None`` for one seed),
        "seed_aucs": pooled AUC of each seed, "fold_aucs": {case: mean over seeds}}``.
    """
    scores = np.stack([np.asarray(s, dtype=np.float64) for s in seed_scores])  # (K, N)
    if not np.isfinite(scores).all():
        raise ValueError("some crops have no out-of-fold score")
    seed_aucs = _auc_rows(scores, np.broadcast_to(y, scores.shape))
    idx = stratified_bootstrap(y, cases, n_boot, seed)
    boot = np.mean([_auc_rows(s[idx], y[idx]) for s in scores], axis=0)  # (n_boot,)
    folds = {}
    for name in np.unique(cases):
        rows = cases == name
        folds[str(name)] = float(
            _auc_rows(scores[:, rows], np.broadcast_to(y[rows], (len(scores), rows.sum()))).mean()
        )
    return {
        "auc": float(seed_aucs.mean()),
        "interval": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "spread": float(seed_aucs.std(ddof=1)) if len(scores) > 1 else None,
        "seed_aucs": [float(a) for a in seed_aucs],
        "fold_aucs": folds,
    }
