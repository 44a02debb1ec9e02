"""Segmentation adapter: a light FPN decoder over a frozen (or fine-tuned) encoder.

The decoder reads every scale of ``encoder.forward_intermediates(x)`` the way a feature pyramid
network does (Lin et al., https://arxiv.org/abs/1612.03144), in the spirit of UNETR's decoder
over ViT features (https://arxiv.org/abs/2103.10504) but much lighter: a 1x1x1 lateral conv maps
each level to ``width`` channels, the coarser sum is upsampled and added level by level, a small
conv block follows at the finest level, a 1x1x1 conv gives the class logits, and they are
upsampled to the input size. It works for every encoder of :data:`omnienc.encoders.ENCODERS`:
the residual conv encoders have strides 2, 4, 8, 16 and the 3D ViTs one stride (its patch size)
for all four levels, where the top-down path is a plain sum.

Training (:func:`train_segmentation`) is a Lightning run on random crops of labelled volumes,
class-balanced by MONAI's ``RandCropByLabelClassesd``, with ``DiceCELoss`` and AdamW; evaluation
(:func:`evaluate_segmentation`) sweeps whole volumes with ``sliding_window_inference`` and scores
them with ``DiceMetric``; :func:`predict_volume` returns a label map on a file's own grid.

Items are :class:`SegItem` objects: a preprocessed image ``(C, X, Y, Z)`` and its integer label
map ``(1, X, Y, Z)`` on the same grid, labels ``0..num_classes - 1`` (0 = background). Build them
from image/label files with :func:`items_from_pairs` (which keeps a chosen set of structures and
renumbers them) or from MedSegBench with :func:`medsegbench_items`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import ClassesToIndicesd, RandCropByLabelClassesd, SpatialResample
from torch import nn
from torch.utils.data import DataLoader, Dataset

from omnienc.checkpoint import load_checkpoint_config, load_encoder, load_extra, save_encoder
from omnienc.config import JsonConfig
from omnienc.data.labeled import LabeledVolumes
from omnienc.data.medsegbench import MedSegBench
from omnienc.encoders.base import Encoder
from omnienc.errors import CheckpointError
from omnienc.io import Volume, read_volume
from omnienc.optim import adamw_warmup_cosine, decay_groups
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

DECODER_NAME = "seg_decoder"  # name of the decoder weights beside an exported encoder
_INDICES_KEY = "label_cls_indices"


@dataclass(frozen=True)
class SegDecoderConfig(JsonConfig):
    """The decoder, its loss and its optimiser.

    Attributes:
        num_classes: Output classes ``K``, background (label 0) included; >= 2.
        width: Channels of the decoder's common feature width.
        freeze_encoder: Keep the encoder frozen (the adapter setting); ``False`` fine-tunes it.
        dice_weight: Weight of the Dice term of ``DiceCELoss``.
        ce_weight: Weight of its cross-entropy term.
        lr: Peak AdamW learning rate of the decoder.
        encoder_lr_scale: Encoder learning rate as a fraction of ``lr`` when fine-tuning.
        weight_decay: AdamW weight decay of kernels (not of biases and norm parameters).
        warmup_steps: Linear warm-up steps before the cosine decay to 5 % of ``lr``.
        overlap: Sliding-window overlap in validation and prediction, in ``[0, 1)``.
        sw_batch_size: Windows per forward pass in validation and prediction.
    """

    config_name = "segmentation decoder config"

    num_classes: int = 2
    width: int = 32
    freeze_encoder: bool = True
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    overlap: float = 0.25
    sw_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes counts background and must be >= 2, got {self.num_classes}"
            )
        if self.width < 1 or self.sw_batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("width and sw_batch_size must be >= 1 and warmup_steps >= 0")
        if min(self.dice_weight, self.ce_weight) < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        if self.lr <= 0 or self.encoder_lr_scale < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0; encoder_lr_scale and weight_decay >= 0")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")


@dataclass
class SegItem:
    """One labelled volume on one grid.

    Attributes:
        image: ``(C, X, Y, Z)`` float32, preprocessed as the encoder expects.
        label: ``(1, X, Y, Z)`` int64, ``0`` background, ``1..K-1`` structures.
        id: Where it came from (a file path, a MedSegBench id).
    """

    image: torch.Tensor
    label: torch.Tensor
    id: str

    def __post_init__(self) -> None:
        if self.image.ndim != 4 or self.label.ndim != 4 or self.label.shape[0] != 1:
            raise ValueError(
                f"{self.id}: expected image (C, X, Y, Z) and label (1, X, Y, Z), got "
                f"{tuple(self.image.shape)} and {tuple(self.label.shape)}"
            )
        if self.image.shape[1:] != self.label.shape[1:]:
            raise ValueError(
                f"{self.id}: image grid {tuple(self.image.shape[1:])} differs from its label "
                f"grid {tuple(self.label.shape[1:])}"
            )
        self.image = self.image.float()
        self.label = self.label.long()


def select_structures(label: torch.Tensor, structures: Sequence[int]) -> torch.Tensor:
    """Keep some labels and renumber them ``1..len(structures)``; everything else becomes 0.

    Args:
        label: Integer label map of any shape.
        structures: Label values to keep, in the order of their new numbers.

    Returns:
        int64 tensor of ``label``'s shape.
    """
    if not structures or len(set(structures)) != len(structures) or min(structures) < 1:
        raise ValueError(f"structures must be distinct labels >= 1, got {list(structures)}")
    out = torch.zeros_like(label, dtype=torch.long)
    for new, old in enumerate(structures, start=1):
        out[label == old] = new
    return out


def items_from_pairs(
    pairs: Sequence[tuple[str | Path, str | Path]],
    preprocessing: Preprocessing,
    structures: Sequence[int] | None = None,
    modality: str | None = None,
) -> list[SegItem]:
    """Preprocess image/label-map file pairs into items.

    Args:
        pairs: ``[(image_path, label_path), ...]`` on identical grids.
        preprocessing: The encoder's preprocessing (labels follow by nearest neighbour).
        structures: Keep only these label values, renumbered ``1..n`` (see
            :func:`select_structures`); ``None`` keeps the labels as stored.
        modality: Force the modality of every image.

    Raises:
        DataError: A label grid differs from its image (the message names both files) or a
            label map is not integer-valued.
        VolumeReadError: A file cannot be read.
    """
    ds = LabeledVolumes(pairs, preprocessing=preprocessing, modality=modality)
    items = []
    for i in range(len(ds)):
        d = ds[i]
        label = d["label"] if structures is None else select_structures(d["label"], structures)
        items.append(SegItem(d["image"], label, d["id"]))
    return items


def medsegbench_items(dataset: MedSegBench) -> list[SegItem]:
    """Items of a MedSegBench split: the lifted ``(1, 16, H, W)`` images and label maps.

    Train with ``num_classes=dataset.n_classes`` and a crop of depth 16 (the lifted depth,
    :data:`omnienc.lifting.LIFT_DEPTH`), e.g. ``(16, 64, 64)``. Dice on a lifted item is computed
    over its 16 identical slices.
    """
    return [
        SegItem(d["image"], d["mask"], d["id"]) for d in (dataset[i] for i in range(len(dataset)))
    ]


def _upsample(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Upsample ``(B, C, d, h, w)`` by ``factor`` (trilinear) and crop to ``size`` at the high end.

    Feature voxel ``j`` of stride ``r`` covers input voxels ``[j r, (j + 1) r)``; scaling by the
    stride ratio with ``align_corners=False`` keeps those centres aligned, and the encoders'
    ``ceil`` rule means the upsampled grid covers ``size`` with at most ``factor - 1`` voxels to
    spare.
    """
    target = tuple(int(s) for s in size)
    up = tuple(int(s) * factor for s in x.shape[2:])
    if any(u < t for u, t in zip(up, target, strict=True)):
        raise ValueError(
            f"a stride-{factor} feature map {tuple(x.shape[2:])} cannot cover {target}: the "
            "encoder does not follow the ceil(n / stride) rule of the encoder contract"
        )
    if factor > 1:
        x = F.interpolate(x, size=up, mode="trilinear", align_corners=False)
    return x[:, :, : target[0], : target[1], : target[2]]


class SegmentationDecoder(nn.Module):
    """FPN-style decoder over an encoder's intermediate feature maps.

    Args:
        feature_info: The encoder's ``feature_info`` (``num_chs``, ``reduction`` per level,
            shallow to deep); each reduction must divide the next.
        num_classes: Output classes ``K`` (background included).
        width: Common channel width of the pyramid.
    """

    def __init__(
        self, feature_info: Sequence[Mapping[str, Any]], num_classes: int, width: int = 32
    ) -> None:
        super().__init__()
        reductions = [int(f["reduction"]) for f in feature_info]
        if not reductions:
            raise ValueError("feature_info is empty")
        if any(b % a for a, b in itertools.pairwise(reductions)):
            raise ValueError(f"each reduction must divide the next, got {reductions}")
        self.reductions = reductions
        self.num_classes, self.width = int(num_classes), int(width)
        self.lateral = nn.ModuleList(nn.Conv3d(int(f["num_chs"]), width, 1) for f in feature_info)
        groups = math.gcd(8, width)  # GroupNorm: works on a 1-voxel grid, unlike InstanceNorm
        self.block = nn.Sequential(
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.classifier = nn.Conv3d(width, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Class logits at the input resolution.

        Args:
            features: One ``(B, num_chs_i, D_i, H_i, W_i)`` map per ``feature_info`` entry.
            out_size: ``(D, H, W)`` of the encoder's input.

        Returns:
            ``(B, K, D, H, W)`` logits.
        """
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(features)}")
        x = self.lateral[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            skip = self.lateral[i](features[i])
            ratio = self.reductions[i + 1] // self.reductions[i]
            x = _upsample(x, ratio, skip.shape[2:]) + skip
        # The 1x1x1 classifier and trilinear upsampling are both linear (and the interpolation
        # weights sum to 1), so classifying before upsampling is exact and K/width times cheaper.
        logits = self.classifier(self.block(x))
        return _upsample(logits, self.reductions[0], out_size)


class SegmentationModel(nn.Module):
    """Encoder + segmentation decoder.

    With ``freeze_encoder`` the encoder's parameters get ``requires_grad=False``, its forward pass
    runs without autograd, and it stays in eval mode even when the model is put in training mode,
    so nothing about it changes while the decoder trains: no dropout, and no normalisation
    statistics are updated (InstanceNorm here tracks none, but a BatchNorm encoder would).

    Args:
        encoder: Any :class:`~omnienc.encoders.base.Encoder`.
        decoder: A decoder built for ``encoder.feature_info``.
        freeze_encoder: Freeze the encoder (``False``: train it with the decoder).

    Attributes:
        roi_size: Sliding-window size for whole volumes (set by :func:`train_segmentation` to its
            crop size), or ``None``.
    """

    def __init__(
        self, encoder: Encoder, decoder: SegmentationDecoder, freeze_encoder: bool = True
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.freeze_encoder = bool(freeze_encoder)
        self.roi_size: tuple[int, int, int] | None = None
        self.encoder.requires_grad_(not self.freeze_encoder)
        if self.freeze_encoder:
            self.encoder.eval()

    def train(self, mode: bool = True) -> SegmentationModel:
        """Set training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, K, D, H, W)``.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder.forward_intermediates(x)
        return self.decoder(feats, x.shape[2:])


def build_segmentation_model(encoder: Encoder, config: SegDecoderConfig) -> SegmentationModel:
    """A decoder for ``encoder`` as ``config`` says, and the two as one model."""
    decoder = SegmentationDecoder(encoder.feature_info, config.num_classes, config.width)
    return SegmentationModel(encoder, decoder, freeze_encoder=config.freeze_encoder)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def sliding_window_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Class probabilities of a whole volume by MONAI's sliding-window inference.

    Windows of ``roi_size`` (the training crop) overlap by ``overlap``; their softmax
    probabilities are blended with Gaussian weights; a volume smaller than a window is padded
    with its minimum and the padding cut off again.

    Args:
        model: Maps ``(n, C, *roi_size)`` to ``(n, K, *roi_size)`` logits.
        image: ``(B, C, X, Y, Z)``.
        roi_size: Window size ``(S_x, S_y, S_z)``.
        overlap: In ``[0, 1)``.
        sw_batch_size: Windows per forward pass.

    Returns:
        ``(B, K, X, Y, Z)`` float32 probabilities on ``image``'s device.
    """
    device = _device(model)
    out = sliding_window_inference(
        image.to(device),
        roi_size=tuple(int(s) for s in roi_size),
        sw_batch_size=sw_batch_size,
        predictor=lambda w: torch.softmax(model(w).float(), dim=1),
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=float(image.min()),
    )
    assert isinstance(out, torch.Tensor)
    return out.as_subclass(torch.Tensor).to(image.device)


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every foreground class, by MONAI's ``DiceMetric`` on label maps.

    Args:
        pred: ``(B, 1, X, Y, Z)`` predicted labels.
        label: ``(B, 1, X, Y, Z)`` true labels.
        num_classes: ``K``, background included.

    Returns:
        ``(B, K - 1)``; NaN where a class is absent from ``label`` (``ignore_empty``).
    """
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes)
    scores = metric(pred.float(), label.float())
    assert isinstance(scores, torch.Tensor)
    return scores.float().cpu()


def _check_labels(items: Sequence[SegItem], num_classes: int) -> None:
    for item in items:
        top = int(item.label.max())
        if top >= num_classes or int(item.label.min()) < 0:
            raise ValueError(
                f"{item.id}: labels run from {int(item.label.min())} to {top}, but the decoder "
                f"has num_classes={num_classes} (labels 0..{num_classes - 1}); select and "
                "renumber structures first (items_from_pairs(..., structures=[...]))"
            )


def _pad_min(item: SegItem, size: Sequence[int]) -> dict[Hashable, torch.Tensor]:
    """Image and label padded (symmetrically; image minimum, label 0) to at least ``size``."""
    pads: list[int] = []
    for n, s in zip(reversed(item.image.shape[1:]), reversed(tuple(size)), strict=True):
        extra = max(0, int(s) - int(n))
        pads += [extra // 2, extra - extra // 2]
    image = F.pad(item.image, pads, value=float(item.image.min()))
    return {"image": image, "label": F.pad(item.label, pads, value=0)}


class RandomCrops(Dataset[dict[str, torch.Tensor]]):
    """``length`` class-balanced random crops of labelled items, fixed by ``seed`` and index.

    Each crop is centred on a voxel of a class drawn uniformly among the classes present in a
    uniformly drawn item (MONAI ``RandCropByLabelClassesd``, background counting as a class),
    so a small organ is seen as often as the background.

    Args:
        items: The training items (padded here to at least ``crop_size``).
        crop_size: ``(S_x, S_y, S_z)``.
        num_classes: ``K``.
        length: Number of crops (steps x batch size).
        seed: Fixes every crop.
    """

    def __init__(
        self,
        items: Sequence[SegItem],
        crop_size: Sequence[int],
        num_classes: int,
        length: int,
        seed: int,
    ) -> None:
        if not items:
            raise ValueError("RandomCrops needs at least one item")
        indexer = ClassesToIndicesd(keys="label", num_classes=num_classes)
        self._data = [indexer(_pad_min(item, crop_size)) for item in items]
        self.cropper = RandCropByLabelClassesd(
            keys=["image", "label"],
            label_key="label",
            spatial_size=tuple(int(s) for s in crop_size),
            num_classes=num_classes,
            indices_key=_INDICES_KEY,
            warn=False,
        )
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        data = self._data[int(rng.integers(len(self._data)))]
        self.cropper.set_random_state(seed=int(rng.integers(2**31)))
        out = self.cropper(data)[0]
        return {k: torch.as_tensor(out[k]).as_subclass(torch.Tensor) for k in ("image", "label")}


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
    crop = tuple(int(s) for s in crop_size)
    if len(crop) != 3 or min(crop) < 1:
        raise ValueError(f"crop_size must be three positive ints, got {crop_size!r}")
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


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluate_segmentation(
    model: SegmentationModel,
    items: Sequence[SegItem],
    class_names: Sequence[str] | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> dict[str, Any]:
    """Dice per structure on whole items (their preprocessed grid), by sliding windows.

    Args:
        model: A trained model.
        items: Labelled volumes.
        class_names: Names of classes ``1..K-1`` (default ``"1"``, ``"2"``, ...).
        roi_size: Window size (default ``model.roi_size``).
        overlap: Sliding-window overlap.
        sw_batch_size: Windows per forward pass.

    Returns:
        ``{"dice": {name: mean over the items that contain it, or None}, "mean_dice": mean of
        those, "per_item": [{"id", "dice": {name: value or None}}], "n_items"}``.
    """
    k = model.decoder.num_classes
    names = list(class_names) if class_names is not None else [str(i) for i in range(1, k)]
    if len(names) != k - 1:
        raise ValueError(f"need {k - 1} class names (background excluded), got {len(names)}")
    roi = roi_size or model.roi_size
    if roi is None:
        raise ValueError(
            "give roi_size: the model has none (it was not made by train_segmentation)"
        )
    _check_labels(items, k)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for item in items:
                prob = sliding_window_probabilities(
                    model, item.image[None], roi, overlap, sw_batch_size
                )
                rows.append(dice_scores(prob.argmax(1, keepdim=True), item.label[None], k)[0])
    finally:
        model.train(was_training)
    scores = torch.stack(rows) if rows else torch.full((0, k - 1), float("nan"))
    per_class = [_nan_to_none(float(v)) for v in torch.nanmean(scores, dim=0)]
    present = [v for v in per_class if v is not None]
    return {
        "dice": dict(zip(names, per_class, strict=True)),
        "mean_dice": float(np.mean(present)) if present else None,
        "per_item": [
            {
                "id": it.id,
                "dice": {n: _nan_to_none(float(v)) for n, v in zip(names, r, strict=True)},
            }
            for it, r in zip(items, rows, strict=True)
        ],
        "n_items": len(items),
    }


def resample_argmax(
    prob: torch.Tensor, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray
) -> np.ndarray:
    """Resample class probabilities onto another grid of the same world and take the argmax.

    One class at a time (MONAI ``SpatialResample``, trilinear, edge values outside), keeping a
    running maximum, so memory stays at two target-sized maps whatever ``K`` is.

    Args:
        prob: ``(K, X', Y', Z')`` probabilities on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-world matrix of ``prob``.
        shape: ``(X, Y, Z)`` of the target grid.
        target_affine: ``(4, 4)`` voxel-to-world matrix of the target grid.

    Returns:
        ``(X, Y, Z)`` int64 labels.
    """
    resample = SpatialResample(mode="bilinear", padding_mode="border")
    src = torch.as_tensor(np.asarray(affine, np.float64))
    dst = torch.as_tensor(np.asarray(target_affine, np.float64))
    size = tuple(int(s) for s in shape)
    best = torch.full(size, -1.0)
    labels = torch.zeros(size, dtype=torch.long)
    for k in range(prob.shape[0]):
        p = resample(MetaTensor(prob[k : k + 1].float().cpu(), affine=src), dst, spatial_size=size)
        p = torch.as_tensor(p).as_subclass(torch.Tensor)[0].float()
        better = p > best
        best = torch.where(better, p, best)
        labels[better] = k
    return labels.numpy()


def predict_volume(
    model: nn.Module,
    volume_path: str | Path | Volume,
    preprocessing: Preprocessing,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    modality: str | None = None,
) -> Volume:
    """Segment a volume file and return the label map on its own grid.

    The volume gets ``preprocessing`` without the foreground crop and the fixed-size pad/crop,
    so that the preprocessed grid covers the whole file; the sliding-window probabilities are
    resampled onto the grid :func:`omnienc.io.read_volume` gives (the file's voxels in RAS axis
    order, its affine) and the most probable class is taken per voxel.

    Args:
        model: A trained :class:`SegmentationModel` (any module mapping ``(n, C, *roi)`` to
            ``(n, K, *roi)`` logits works).
        volume_path: Image file or DICOM folder, or a :class:`~omnienc.io.Volume` already read
            with :func:`~omnienc.io.read_volume`.
        preprocessing: The preprocessing the model was trained with.
        roi_size: Window size (default ``model.roi_size``).
        overlap: Sliding-window overlap.
        sw_batch_size: Windows per forward pass.
        modality: Force the image modality.

    Returns:
        A :class:`~omnienc.io.Volume` like :func:`omnienc.data.labeled.read_label_map` returns:
        ``array`` ``(X, Y, Z)`` float32 holding integer labels, and the image's ``affine``,
        ``spacing`` and ``source``. Write it with ``write_volume(vol, path, dtype=np.uint8)``.

    Raises:
        VolumeReadError: The file cannot be read.
        ValueError: No ``roi_size`` given and the model has none.
    """
    roi = roi_size or getattr(model, "roi_size", None)
    if roi is None:
        raise ValueError(
            "give roi_size: the model has none (it was not made by train_segmentation)"
        )
    volume = (
        volume_path
        if isinstance(volume_path, Volume)
        else read_volume(volume_path, modality=modality)
    )
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    out = preprocess_volume(volume, pre)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            image = torch.from_numpy(out["image"])[None]
            prob = sliding_window_probabilities(model, image, roi, overlap, sw_batch_size)[0]
    finally:
        model.train(was_training)
    labels = resample_argmax(prob, out["affine"], volume.shape, volume.affine)
    return Volume(
        array=labels.astype(np.float32),
        affine=volume.affine.copy(),
        spacing=volume.spacing,
        modality="unknown",
        modality_source="none",
        source=volume.source,
    )


def save_segmentation_model(
    model: SegmentationModel,
    path: str | Path,
    preprocessing: Preprocessing,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Export the encoder with the decoder beside it (``seg_decoder.safetensors``).

    ``meta["seg_decoder"]`` records the decoder's ``num_classes``, ``width``, the window size and
    whether the encoder was frozen; a fine-tuned encoder is saved with its new weights.
    """
    record = {
        "num_classes": model.decoder.num_classes,
        "width": model.decoder.width,
        "roi_size": list(model.roi_size) if model.roi_size else None,
        "freeze_encoder": model.freeze_encoder,
    }
    full_meta = {**(meta or {}), DECODER_NAME: record}
    return save_encoder(
        model.encoder, path, preprocessing, meta=full_meta, extra={DECODER_NAME: model.decoder}
    )


def load_segmentation_model(path: str | Path) -> tuple[SegmentationModel, Preprocessing]:
    """Load what :func:`save_segmentation_model` wrote; the model is in eval mode.

    Raises:
        CheckpointError: The checkpoint has no decoder, or its record or weights do not fit.
    """
    path = Path(path)
    encoder, preprocessing = load_encoder(path)
    record = (load_checkpoint_config(path).get("meta") or {}).get(DECODER_NAME)
    if not isinstance(record, dict):
        raise CheckpointError(
            path, f"no {DECODER_NAME!r} record in meta: not saved by save_segmentation_model"
        )
    try:
        decoder = SegmentationDecoder(encoder.feature_info, record["num_classes"], record["width"])
        decoder.load_state_dict(load_extra(path, DECODER_NAME), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"{DECODER_NAME} does not fit its record: {e}") from e
    model = SegmentationModel(encoder, decoder, freeze_encoder=bool(record.get("freeze_encoder")))
    roi = record.get("roi_size")
    model.roi_size = (int(roi[0]), int(roi[1]), int(roi[2])) if roi else None
    return model.eval(), preprocessing


__all__ = [
    "SegDecoderConfig",
    "SegItem",
    "SegmentationDecoder",
    "SegmentationModel",
    "SegmentationModule",
    "build_segmentation_model",
    "evaluate_segmentation",
    "items_from_pairs",
    "load_segmentation_model",
    "medsegbench_items",
    "predict_volume",
    "save_segmentation_model",
    "select_structures",
    "train_segmentation",
]
