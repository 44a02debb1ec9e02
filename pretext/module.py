"""The pretraining LightningModule: mask-guided in-context segmentation + contrastive.

One encoder pass over both crops serves both objectives (DESIGN.md, "Pretext"): the reference and
query crops are encoded together; the in-context head segments, in the query, each task given by
a mask on the reference (MASS, https://arxiv.org/abs/2603.13660); the pooled deepest features of
the two crops are the two views of the contrastive loss.

``model.recipe: monai_ssl`` trains the same encoder on the same pairs with the peer baseline
instead (:mod:`omnienc.pretext.monai_ssl`: inpainting + rotation + contrastive), so both recipes
share the CLI, data, budget and export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from omnienc.encoders import build_encoder
from omnienc.encoders.base import Encoder
from omnienc.errors import OmniencError
from omnienc.optim import adamw_warmup_cosine, decay_groups
from omnienc.pretext.augment import PARAM_KEYS
from omnienc.pretext.contrastive import ContrastiveConfig, ContrastiveObjective
from omnienc.pretext.incontext import HeadConfig, InContextHead, incontext_loss
from omnienc.pretext.matching import MatchingConfig, prototype_matching_loss
from omnienc.pretext.monai_ssl import (
    InpaintingObjective,
    MonaiSSLConfig,
    MonaiSSLObjective,
    require_square_axial,
    turn_axial,
)

RECIPES = ("mass", "monai_ssl")


class NonFiniteLossError(OmniencError):
    """The training loss became NaN or Inf; the run stops instead of corrupting the weights."""


@dataclass
class ModelConfig:
    """The method: encoder, heads, loss weights and optimiser.

    Attributes:
        recipe: ``"mass"`` (in-context segmentation + contrastive) or ``"monai_ssl"`` (the peer
            baseline: MONAI's inpainting + rotation + contrastive recipe).
        encoder: A name in :data:`omnienc.encoders.ENCODERS`.
        encoder_overrides: Config fields of that encoder to change.
        head: The in-context segmentation head.
        contrastive: The contrastive projection head and loss.
        incontext_weight: Weight of Dice + BCE; 0 switches the objective off (``mass``).
        contrastive_weight: Weight of the contrastive loss; 0 switches it off (``mass``).
        inpaint_weight: Weight of MONAI's inpainting loss (L1 reconstruction of corrupted
            reference crops, :class:`~omnienc.pretext.monai_ssl.InpaintingObjective`, with the
            corruptions of ``monai_ssl``) added to the ``mass`` recipe; 0 (default) leaves it
            out. It costs one more encoder pass over the reference crops.
        rotation_weight: Weight of rotation prediction (the MONAI/Swin UNETR pretext) added to
            the ``mass`` recipe: each pair (both crops and their task masks) is turned by a
            random multiple of 90 degrees in the axial plane, and a linear head on the pooled
            deepest features of both crops predicts the turn (cross-entropy). Turning the pair
            together leaves the in-context task unchanged in kind; it costs no encoder pass.
            Needs crops with equal x and y sizes; 0 (default) leaves it out.
        monai_ssl_weight: Weight of the whole MONAI SSL objective (``monai_ssl``: inpainting +
            rotation + contrastive, each view turned and corrupted on its own, with its own
            weights) added to the ``mass`` recipe on the same pair. It costs one more encoder
            pass over both crops; it includes the inpainting loss, so it excludes
            ``inpaint_weight``. 0 (default) leaves it out.
        monai_ssl: Losses and corruptions of the ``monai_ssl`` recipe (and of
            ``inpaint_weight`` and ``monai_ssl_weight`` in the ``mass`` recipe).
        matching_weight: Weight of the parameter-free prototype-matching loss on the encoder's
            own features (:mod:`omnienc.pretext.matching`: PANet's foreground/background
            prototypes from the reference, cosine-matched in the query) on the same pair,
            tasks and encoder pass as the in-context head (``mass``). 0 (default) leaves it
            out.
        matching: Scales and similarity scale of the matching loss.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        schedule_steps: Steps of the cosine schedule (the learning rate stays at its minimum,
            ``lr * min_lr_ratio``, afterwards); ``None`` follows ``trainer.max_steps``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
    """

    recipe: str = "mass"
    encoder: str = "resconv_small"
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=HeadConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    incontext_weight: float = 1.0
    contrastive_weight: float = 1.0
    inpaint_weight: float = 0.0
    rotation_weight: float = 0.0
    monai_ssl_weight: float = 0.0
    monai_ssl: MonaiSSLConfig = field(default_factory=MonaiSSLConfig)
    matching_weight: float = 0.0
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    schedule_steps: int | None = None
    min_lr_ratio: float = 0.05

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        weights = (
            self.incontext_weight,
            self.contrastive_weight,
            self.inpaint_weight,
            self.rotation_weight,
            self.monai_ssl_weight,
            self.matching_weight,
        )
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if max(weights) == 0:
            raise ValueError("every objective is switched off; set a weight > 0")
        if self.inpaint_weight > 0 and self.monai_ssl_weight > 0:
            raise ValueError(
                "model.monai_ssl_weight already includes the inpainting loss: set "
                "model.inpaint_weight to 0, or weigh inpainting by model.monai_ssl.inpaint_weight"
            )
        if self.recipe == "monai_ssl" and self.matching_weight > 0:
            raise ValueError(
                "model.matching_weight needs the pair's task masks, which the monai_ssl recipe "
                "does not use: set model.recipe to mass"
            )

    @property
    def method(self) -> str:
        """A short name of the objectives in use, recorded in the exported checkpoint."""
        ssl = self.monai_ssl
        ssl_weights = {
            "inpaint": ssl.inpaint_weight,
            "rotation": ssl.rotation_weight,
            "contrastive": ssl.contrastive_weight,
        }
        peer = "monai_ssl(" + "+".join(k for k, w in ssl_weights.items() if w > 0) + ")"
        if self.recipe == "monai_ssl":
            return peer
        parts = []
        if self.incontext_weight > 0:
            parts.append("incontext")
        if self.contrastive_weight > 0:
            parts.append(self.contrastive.kind)
        if self.inpaint_weight > 0:
            parts.append("inpaint")
        if self.rotation_weight > 0:
            parts.append("rotation")
        if self.matching_weight > 0:
            parts.append("matching")
        if self.monai_ssl_weight > 0:
            parts.append(peer)
        return "+".join(parts)


class PretrainModule(pl.LightningModule):
    """Encoder + the objectives of ``config.recipe``.

    Only the modules of objectives in use are built, so that DDP finds no unused parameters.

    Args:
        config: The :class:`ModelConfig`.
        crop_size: Crop size of the pairs, ``(S, S, S)``.
        seed: Seeds the ``monai_ssl`` corruptions (with the step and the rank).
    """

    def __init__(self, config: ModelConfig, crop_size: tuple[int, int, int], seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.crop_size = tuple(int(s) for s in crop_size)
        self.seed = int(seed)
        self.encoder: Encoder = build_encoder(config.encoder, **config.encoder_overrides)
        mass = config.recipe == "mass"
        self.head = (
            InContextHead(self.encoder.feature_info, config.head)
            if mass and config.incontext_weight > 0
            else None
        )
        self.contrastive = (
            ContrastiveObjective(self.encoder.embed_dim, config.contrastive)
            if mass and config.contrastive_weight > 0
            else None
        )
        self.monai_ssl = (
            MonaiSSLObjective(self.encoder, self.crop_size, config.monai_ssl)
            if not mass or config.monai_ssl_weight > 0
            else None
        )
        self.inpainting = (
            InpaintingObjective(self.encoder, self.crop_size, config.monai_ssl)
            if mass and config.inpaint_weight > 0
            else None
        )
        self.rotation_head = (
            nn.Linear(self.encoder.embed_dim, 4) if mass and config.rotation_weight > 0 else None
        )
        if self.rotation_head is not None:
            require_square_axial(self.crop_size, "model.rotation_weight")
        self.schedule_steps: int | None = config.schedule_steps

    def forward_pair(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both losses for a batch of pairs.

        Args:
            batch: ``ref_image``/``query_image`` ``(B, 1, S, S, S)``, ``ref_masks``/
                ``query_masks`` ``(B, T, S, S, S)``, ``task_valid`` ``(B, T)``.

        Returns:
            ``loss`` (weighted sum) and its parts ``incontext``, ``dice``, ``contrastive``,
            ``inpaint``, ``rotation``, ``matching`` (and ``matching_dice``, a readout).
        """
        ref, query = batch["ref_image"], batch["query_image"]
        seed = (self.seed * 1_000_003 + int(self.global_step)) * 1_009 + self.global_rank
        if self.config.recipe == "monai_ssl":
            assert self.monai_ssl is not None
            return self.monai_ssl(self.encoder, ref, query, seed=seed)
        b = ref.shape[0]
        ref_masks, query_masks = batch["ref_masks"], batch["query_masks"]
        if self.rotation_head is not None:  # turn each pair, crops and masks alike
            turns = torch.randint(0, 4, (b,), generator=torch.Generator().manual_seed(seed + 2))
            ref, query = turn_axial(ref, turns), turn_axial(query, turns)
            ref_masks, query_masks = turn_axial(ref_masks, turns), turn_axial(query_masks, turns)
        feats = self.encoder.forward_intermediates(torch.cat([ref, query]))
        ref_feats = [f[:b] for f in feats]
        query_feats = [f[b:] for f in feats]
        pooled = feats[-1].mean(dim=(2, 3, 4))  # (2B, E): the encoder's own pooling
        out: dict[str, torch.Tensor] = {}
        loss = ref.new_zeros(())
        if self.head is not None:
            logits = self.head(ref_feats, ref_masks, query_feats, tuple(query.shape[2:]))
            ic = incontext_loss(logits, query_masks, batch["task_valid"])
            loss = loss + self.config.incontext_weight * ic["loss"]
            out["incontext"] = ic["loss"].detach()
            out["dice"] = ic["dice"]
        if self.config.matching_weight > 0:
            match = prototype_matching_loss(
                ref_feats,
                ref_masks,
                query_feats,
                query_masks,
                batch["task_valid"],
                self.config.matching,
            )
            loss = loss + self.config.matching_weight * match["loss"]
            out["matching"] = match["loss"].detach()
            out["matching_dice"] = match["dice"]
        if self.rotation_head is not None:
            with torch.autocast(device_type=ref.device.type, enabled=False):
                rot_logits = self.rotation_head(pooled.float())
                rotation = F.cross_entropy(rot_logits, turns.to(ref.device).repeat(2))
            loss = loss + self.config.rotation_weight * rotation
            out["rotation"] = rotation.detach()
        if self.contrastive is not None:
            c = self.contrastive(pooled[:b], pooled[b:])
            loss = loss + self.config.contrastive_weight * c
            out["contrastive"] = c.detach()
        if self.inpainting is not None:
            l1 = self.inpainting.inpainting_loss(self.encoder, ref, seed=seed)
            loss = loss + self.config.inpaint_weight * l1
            out["inpaint"] = l1.detach()
        if self.monai_ssl is not None:  # the peer's objective on the untouched pair
            ssl = self.monai_ssl(self.encoder, batch["ref_image"], batch["query_image"], seed=seed)
            loss = loss + self.config.monai_ssl_weight * ssl["loss"]
            out.update({f"monai_ssl_{k}": v.detach() for k, v in ssl.items()})
        out["loss"] = loss
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if PARAM_KEYS[0] in batch:
            raise RuntimeError(
                "the batch reached training_step without its views: apply "
                "omnienc.pretext.augment.augment_views after the transfer (the "
                "PretrainDataModule's on_after_batch_transfer does)"
            )
        out = self.forward_pair(batch)
        if not torch.isfinite(out["loss"]):
            parts = ", ".join(f"{k}={float(v):.4g}" for k, v in out.items())
            raise NonFiniteLossError(
                f"step {self.global_step}",
                f"non-finite training loss ({parts}); the run stops here. The last "
                "checkpoint is intact: lower model.lr or check the input volumes",
            )
        bs = batch["ref_image"].shape[0]
        for key, value in out.items():
            self.log(f"train/{key}", value, prog_bar=key in ("loss", "dice"), batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)  # type: ignore[union-attr]
        return out["loss"]

    def _sync_data_step(self) -> None:
        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        if dm is not None and hasattr(dm, "set_step"):
            dm.set_step(self.global_step)

    def on_train_start(self) -> None:
        # A run resumed from an epoch-end checkpoint finishes that epoch without calling
        # on_train_epoch_start: key its next batch on the restored step here.
        self._sync_data_step()

    def on_train_epoch_start(self) -> None:
        self._sync_data_step()

    def configure_optimizers(self) -> Any:
        if self.schedule_steps is None and self.trainer.max_steps and self.trainer.max_steps > 0:
            self.schedule_steps = int(self.trainer.max_steps)
        cfg = self.config
        return adamw_warmup_cosine(
            decay_groups(self, cfg.lr, cfg.weight_decay),
            cfg.warmup_steps,
            self.schedule_steps,
            cfg.min_lr_ratio,
        )

    def export_meta(self) -> dict[str, Any]:
        """What the exported checkpoint records about pretraining."""
        return {
            "pretext": self.config.method,
            "step": int(self.global_step),
            "epoch": int(self.current_epoch),
            "crop_size": list(self.crop_size),
            "incontext_head": asdict(self.config.head) if self.head is not None else None,
            "model": asdict(self.config),  # tuples are written as JSON lists
        }

    def heads(self) -> dict[str, nn.Module]:
        """Modules exported beside the encoder (the in-context head, when trained)."""
        return {} if self.head is None else {"incontext_head": self.head}
