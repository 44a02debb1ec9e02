"""End-to-end classification with labels: supervised from scratch, and fine-tuning.

The two baselines of the benchmark that train the encoder itself (the probes in
:mod:`omnienc.adapters.classification.probes` keep it frozen):

* **supervised from scratch**: a random-init encoder of the same architecture + a linear layer,
  trained end-to-end on the labelled training split;
* **fine-tuning**: the same, starting from the pretrained encoder (``encoder_lr_scale`` < 1 keeps
  its weights closer to where pretraining left them).

The loss is cross-entropy over the ``C`` classes of single-label targets (binary, multi-class
and ordinal sets alike: RetinaMNIST's grades are scored as multi-class, as MedMNIST's evaluator
does) and binary cross-entropy per label for multi-label targets. Both run a fixed budget of
optimizer steps (``FinetuneConfig.steps``, so that the budget is stated and equal for both),
with random flips as augmentation, AdamW with warm-up and cosine decay, and pick the step with
the best validation AUC (evaluated every ``eval_every`` steps); the test split is scored once,
with that state, by the probes' metrics and bootstrap intervals.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from omnienc.adapters.classification.metrics import (
    ProbeResult,
    as_targets,
    bootstrap_intervals,
    classification_metrics,
    task_of,
)
from omnienc.config import JsonConfig
from omnienc.embed import pad_to_stride
from omnienc.encoders.base import Encoder
from omnienc.optim import adamw_warmup_cosine, decay_groups


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """Budget and optimiser of end-to-end training.

    Attributes:
        steps: Optimizer steps (the budget), >= 1.
        batch_size: Training batch size.
        lr: Peak AdamW learning rate of the linear head (and of the encoder, times
            ``encoder_lr_scale``).
        encoder_lr_scale: Encoder learning rate as a fraction of ``lr`` (1 from scratch; e.g.
            0.1 when fine-tuning).
        weight_decay: AdamW weight decay of weight matrices and kernels.
        warmup_steps: Linear warm-up steps before the cosine decay.
        eval_every: Steps between validation evaluations (and at the last step).
        flips: Random flips along each spatial axis as augmentation.
        seed: Seeds the head, the sampling and the augmentation.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup_steps: int = 20
    eval_every: int = 50
    flips: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_every) < 1:
            raise ValueError("steps, batch_size and eval_every must be >= 1")
        if not self.lr > 0 or not self.encoder_lr_scale >= 0:
            raise ValueError(
                f"need lr > 0 and encoder_lr_scale >= 0, got {self.lr}, {self.encoder_lr_scale}"
            )


def _targets(labels: np.ndarray) -> tuple[np.ndarray, bool]:
    """Labels through :func:`~.metrics.as_targets`, and whether multi-label."""
    y = as_targets(labels)
    return y, y.ndim == 2


def dataset_labels(dataset: Dataset[dict[str, Any]]) -> np.ndarray:
    """The ``(N, k)`` labels of a dataset: its ``labels`` attribute, else read item by item."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.stack([np.asarray(dataset[i]["label"]) for i in range(len(dataset))])  # type: ignore[arg-type]


class Classifier(nn.Module):
    """Encoder + linear layer on its pooled embedding.

    Args:
        encoder: Any omnienc encoder.
        n_outputs: Classes (single-label) or labels (multi-label).
    """

    def __init__(self, encoder: Encoder, n_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.stride = max(int(f["reduction"]) for f in encoder.feature_info)
        self.head = nn.Linear(encoder.embed_dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> logits ``(B, n_outputs)``."""
        return self.head(self.encoder(pad_to_stride(x, self.stride)))


class _ClassifierModule(pl.LightningModule):
    def __init__(
        self,
        model: Classifier,
        config: FinetuneConfig,
        multilabel: bool,
        val_loader: DataLoader,
        classes: np.ndarray,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.multilabel = multilabel
        self.val_loader = val_loader
        self.classes = classes
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.history: list[dict[str, float]] = []
        self._gen = torch.Generator().manual_seed(config.seed)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.flips:
            return x
        for dim in (2, 3, 4):
            flip = torch.rand(x.shape[0], generator=self._gen) < 0.5
            if flip.any():
                x = x.clone()
                x[flip] = x[flip].flip(dim)
        return x

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return F.cross_entropy(logits, y.reshape(-1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(self._augment(batch["image"]))
        loss = self._loss(logits, batch["label"])
        step = self.global_step + 1
        if step % self.config.eval_every == 0 or step == self.config.steps:
            self._validate(step, float(loss.detach()))
        return loss

    @torch.no_grad()
    def _validate(self, step: int, train_loss: float) -> None:
        was_training = self.model.training
        y, proba = predict_proba(self.model, self.val_loader, self.multilabel)
        self.model.train(was_training)
        metrics = classification_metrics(y, proba, self.classes)
        key = metrics["auc"] if np.isfinite(metrics["auc"]) else metrics["acc"]
        self.history.append({"step": step, "train_loss": train_loss, **metrics})
        if self.best is None or key > self.best[0]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = (key, step, state)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        groups = decay_groups(self.model.encoder, cfg.lr * cfg.encoder_lr_scale, cfg.weight_decay)
        groups += decay_groups(self.model.head, cfg.lr, cfg.weight_decay)
        return adamw_warmup_cosine(groups, cfg.warmup_steps, cfg.steps, min_ratio=0.0)


@torch.no_grad()
def predict_proba(
    model: Classifier, loader: DataLoader, multilabel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over a loader, in eval mode.

    Returns:
        ``y`` ``(N,)`` (or ``(N, L)``) and ``proba`` ``(N, C)`` (or ``(N, L)`` per-label).
    """
    model.eval()
    device = next(model.parameters()).device
    ys, ps = [], []
    for batch in loader:
        logits = model(batch["image"].to(device)).float()
        ps.append((torch.sigmoid(logits) if multilabel else logits.softmax(-1)).cpu().numpy())
        ys.append(np.asarray(batch["label"]))
    y, _ = _targets(np.concatenate(ys))
    return y, np.concatenate(ps)


def train_classifier(
    encoder: Encoder,
    train: Dataset[dict[str, Any]],
    val: Dataset[dict[str, Any]],
    test: Dataset[dict[str, Any]],
    config: FinetuneConfig | None = None,
    n_boot: int = 1000,
    progress: bool = False,
) -> ProbeResult:
    """Train ``encoder`` + a linear layer end-to-end with labels and score the test split.

    Args:
        encoder: Random-init (from scratch) or pretrained (fine-tuning); it is trained in place
            (pass a copy to keep the original).
        train: Items ``{"image": (1, D, H, W), "label": (k,), "id": str}``; likewise ``val`` and
            ``test`` (e.g. :class:`omnienc.data.medmnist.MedMNIST` or a subset of it).
        config: Budget and optimiser.
        n_boot: Bootstrap resamples for the test intervals.
        progress: Show Lightning's progress bar.

    Returns:
        Test metrics at the step with the best validation AUC; ``params`` holds that step, its
        validation AUC, the config, the seconds taken and the validation history.

    Raises:
        ValueError: A split is empty, or the training labels hold a single class.
    """
    config = config or FinetuneConfig()
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if len(ds) == 0:  # type: ignore[arg-type]
            raise ValueError(f"the {name} split is empty")
    ytr, multilabel = _targets(dataset_labels(train))
    yte, _ = _targets(dataset_labels(test))
    if multilabel:
        classes = np.arange(ytr.shape[1])
        n_outputs = ytr.shape[1]
    else:
        classes = np.unique(np.concatenate([ytr, yte, _targets(dataset_labels(val))[0]]))
        if len(np.unique(ytr)) < 2:
            raise ValueError("the training labels hold a single class: nothing to learn")
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(f"class labels must be 0..C-1, got {classes.tolist()}")
        n_outputs = len(classes)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = Classifier(encoder, n_outputs)
    sampler = RandomSampler(
        train,  # type: ignore[arg-type]
        replacement=True,
        num_samples=config.steps * config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    train_loader = DataLoader(train, batch_size=config.batch_size, sampler=sampler)
    val_loader = DataLoader(val, batch_size=64)
    module = _ClassifierModule(model, config, multilabel, val_loader, classes)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=config.steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader)
    seconds = time.perf_counter() - start
    assert module.best is not None, "no validation ran"
    val_score, best_step, state = module.best
    model.load_state_dict(state)
    y, proba = predict_proba(model.cpu(), DataLoader(test, batch_size=64), multilabel)
    return ProbeResult(
        metrics=classification_metrics(y, proba, classes),
        intervals=bootstrap_intervals(y, proba, classes, n_boot=n_boot, seed=config.seed),
        params={
            "best_step": best_step,
            "val_auc": val_score,
            "config": config.to_dict(),
            "train_seconds": round(seconds, 1),
            "history": module.history,
        },
        n={"train": len(train), "val": len(val), "test": len(test)},  # type: ignore[arg-type]
        task=task_of(y, classes),
        test_proba=proba,
    )


def copy_encoder(encoder: Encoder) -> Encoder:
    """A deep copy, so that fine-tuning never changes a loaded pretrained encoder."""
    return copy.deepcopy(encoder)


def stratified_fraction(
    labels: np.ndarray, fraction: float, seed: int = 0, min_per_class: int = 1
) -> np.ndarray:
    """Row indices of a stratified random ``fraction`` of a labelled split.

    Every class keeps ``round(fraction * count)`` rows, at least ``min_per_class`` (so that 1% of
    a small split still has both classes). Multi-label splits are sampled uniformly.

    Args:
        labels: ``(N,)``, ``(N, 1)`` or ``(N, L)`` labels.
        fraction: In ``(0, 1]``; 1 returns every row.
        seed: Seeds the choice.
        min_per_class: Floor on each class's rows.

    Returns:
        Sorted ``(M,)`` int64 indices.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    y, multilabel = _targets(labels)
    n = len(y)
    if fraction == 1:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if multilabel:
        k = max(min_per_class, round(fraction * n))
        return np.sort(rng.choice(n, size=min(n, k), replace=False)).astype(np.int64)
    rows: list[np.ndarray] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = min(len(members), max(min_per_class, round(fraction * len(members))))
        rows.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(rows)).astype(np.int64)


def label_counts(labels: np.ndarray) -> dict[str, int]:
    """Rows per class (single-label) or positives per label (multi-label), as a JSON dict."""
    y, multilabel = _targets(labels)
    if multilabel:
        return {str(i): int(v) for i, v in enumerate(y.sum(axis=0))}
    values, counts = np.unique(y, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


__all__: Sequence[str] = (
    "Classifier",
    "FinetuneConfig",
    "copy_encoder",
    "dataset_labels",
    "label_counts",
    "predict_proba",
    "stratified_fraction",
    "train_classifier",
)
