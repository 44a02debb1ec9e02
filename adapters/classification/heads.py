"""Trained heads on frozen features: attention pooling over the token map, or an MLP.

:func:`train_head_probe` trains a head with Lightning for several seeds and reports the mean
test metrics with their spread over seeds (the probes' metrics and intervals from
:mod:`omnienc.adapters.classification.metrics`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from omnienc.adapters.classification.metrics import (
    ProbeResult,
    Split,
    check_splits,
    classification_metrics,
    test_result,
    val_score,
)

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
        score = val_score(classification_metrics(self.yva, proba, self.classes))
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
    splits, classes = check_splits((train_maps, val_maps, test_maps), feature_ndims=ndims)
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
    result = test_result(splits, np.mean(test_probas, axis=0), classes, params, seeds[0], n_boot)
    result.params["ensemble_metrics"] = result.metrics
    result.metrics = dict(zip(keys, table.mean(axis=0).tolist(), strict=True))
    result.spread = dict(zip(keys, std.tolist(), strict=True))
    result.seed_metrics = runs
    return result
