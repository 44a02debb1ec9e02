"""Training the segmentation adapter: :func:`train_segmentation`.

A Lightning run (:class:`SegmentationModule`) on random crops of labelled volumes, class-balanced
by MONAI's ``RandCropByLabelClassesd``, with ``DiceCELoss`` and AdamW; the encoder stays frozen
unless fine-tuning is asked for.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from omnienc.adapters.segmentation.decoder import (
    SegDecoderConfig,
    SegmentationModel,
    build_segmentation_model,
)
from omnienc.adapters.segmentation.inference import dice_scores, sliding_window_probabilities
from omnienc.adapters.segmentation.items import RandomCrops, SegItem, _check_labels
from omnienc.config import positive_int_triple
from omnienc.encoders.base import Encoder
from omnienc.optim import adamw_warmup_cosine, decay_groups


class SegmentationModule(pl.LightningModule):
    """Training and validation of a :class:`SegmentationModel` (Lightning).

    Args:
        model: The model; its ``roi_size`` is the validation window.
        config: Loss weights, optimiser and sliding-window settings.
        max_steps: Length of the cosine schedule.

    Attributes:
        losses: Training loss of every step.
        val_history: ``{"step", "dice": [K - 1 values], "mean_dice"}`` per validation.
    """

    def __init__(self, model: SegmentationModel, config: SegDecoderConfig, max_steps: int) -> None:
        super().__init__()
        self.model, self.config, self.max_steps = model, config, int(max_steps)
        # batch=True: Dice over the whole batch, so a crop without some class adds no noise.
        self.loss_fn = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            batch=True,
            lambda_dice=config.dice_weight,
            lambda_ce=config.ce_weight,
        )
        self.losses: list[float] = []
        self.val_history: list[dict[str, Any]] = []
        self._val_scores: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = self.loss_fn(logits.float(), batch["label"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"segmentation training: non-finite loss {float(loss)} at step "
                f"{self.global_step}; lower lr or check the input items"
            )
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        roi = self.model.roi_size
        assert roi is not None
        prob = sliding_window_probabilities(
            self.model, batch["image"], roi, self.config.overlap, self.config.sw_batch_size
        )
        pred = prob.argmax(dim=1, keepdim=True)
        self._val_scores.append(dice_scores(pred, batch["label"], self.config.num_classes))

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        per_class = torch.nanmean(torch.cat(self._val_scores), dim=0)
        self._val_scores.clear()
        mean = float(torch.nanmean(per_class))
        self.val_history.append(
            {"step": int(self.global_step), "dice": per_class.tolist(), "mean_dice": mean}
        )
        self.log("val/mean_dice", mean, prog_bar=True)

    def configure_optimizers(self) -> Any:
        cfg = self.config
        groups = decay_groups(self.model.decoder, cfg.lr, cfg.weight_decay)
        if not self.model.freeze_encoder:
            groups += decay_groups(
                self.model.encoder, cfg.lr * cfg.encoder_lr_scale, cfg.weight_decay
            )
        return adamw_warmup_cosine(groups, cfg.warmup_steps, self.max_steps, min_ratio=0.05)


def _item_loader(items: Sequence[SegItem]) -> DataLoader:
    data = [{"image": it.image, "label": it.label} for it in items]
    return DataLoader(data, batch_size=1, shuffle=False)  # type: ignore[arg-type]


def train_segmentation(
    encoder: Encoder,
    train_items: Sequence[SegItem],
    val_items: Sequence[SegItem] | None,
    config: SegDecoderConfig,
    crop_size: Sequence[int],
    steps: int,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = False,
    val_every: int | None = None,
    accelerator: str = "auto",
) -> tuple[SegmentationModel, dict[str, Any]]:
    """Train a decoder (and, with ``freeze_encoder=False``, the encoder) on random crops.

    Args:
        encoder: The encoder; with ``config.freeze_encoder`` it is frozen in place (and
            unchanged), else it is trained in place: pass a copy to keep the original.
        train_items: Labelled training volumes.
        val_items: Whole volumes scored by Dice every ``val_every`` steps and at the end, or
            ``None``/empty for no validation.
        config: Decoder, loss and optimiser.
        crop_size: ``(S_x, S_y, S_z)`` training crop, also the sliding window afterwards. For
            the residual conv encoders keep its deepest grid (``ceil(S / 16)`` per axis) larger
            than one voxel.
        steps: Optimizer steps.
        batch_size: Crops per step.
        seed: Seeds the decoder initialisation and the crops (``seed_everything``).
        progress: Show Lightning's progress bar.
        val_every: Steps between validations (default: only at the end).
        accelerator: Lightning accelerator (``"auto"``: a GPU when there is one).

    Returns:
        The trained model in eval mode (``roi_size`` set to ``crop_size``) and the history
        ``{"loss": [per step], "val": [SegmentationModule.val_history entries], "seconds",
        "steps", "batch_size", "crop_size"}``.

    Raises:
        ValueError: No training items, a bad crop size or step count, or labels outside
            ``0..num_classes - 1`` (the message names the item).
    """
    crop = positive_int_triple("crop_size", crop_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not train_items:
        raise ValueError("train_segmentation needs at least one training item")
    val_items = list(val_items or [])
    _check_labels([*train_items, *val_items], config.num_classes)

    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_segmentation_model(encoder, config)
    model.roi_size = (crop[0], crop[1], crop[2])
    module = SegmentationModule(model, config, max_steps=steps)
    crops = RandomCrops(train_items, crop, config.num_classes, steps * batch_size, seed)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=min(50, steps),
        val_check_interval=min(val_every or steps, steps),
        limit_val_batches=1.0 if val_items else 0,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen encoder
        warnings.filterwarnings("ignore", ".*validation_step` but have no `val_dataloader.*")
        trainer.fit(
            module,
            train_dataloaders=DataLoader(crops, batch_size=batch_size, shuffle=False),
            val_dataloaders=_item_loader(val_items) if val_items else None,
        )
    history = {
        "loss": module.losses,
        "val": module.val_history,
        "seconds": time.perf_counter() - start,
        "steps": steps,
        "batch_size": batch_size,
        "crop_size": list(crop),
    }
    return model.eval(), history


__all__ = [
    "SegDecoderConfig",
    "SegItem",
    "SegmentationModel",
    "SegmentationModule",
    "build_segmentation_model",
    "train_segmentation",
]
