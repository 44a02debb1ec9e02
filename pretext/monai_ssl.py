"""The peer baseline: MONAI's self-supervised recipe (inpainting + rotation + contrastive).

MONAI's self-supervised pretraining tutorial trains a ViT autoencoder (``ViTAutoEnc``) on two
random crops per volume, each corrupted by ``RandCoarseDropout`` (one of: small holes filled
with noise, or everything but large holes filled) then ``RandCoarseShuffle``; an L1 loss
reconstructs the clean crop and MONAI's ``ContrastiveLoss`` pulls the two views together.
Swin UNETR's pretraining (Tang et al., https://arxiv.org/abs/2111.14791), from the same group,
adds rotation prediction (0/90/180/270 degrees in the axial plane) and sums the three losses.
This module is that recipe on any omnienc encoder, so that it trains through the same CLI, data,
budget and export as the MASS recipe and is probed by the same code:

* the two crops of a pair are the two views (``ref_image`` and ``query_image``; the masks are
  not used);
* each view is rotated by a random multiple of 90 degrees about the superior axis, then corrupted;
* a ``ViTAutoEnc``-style decoder (two transposed convolutions) reconstructs the rotated clean
  view from the encoder's deepest feature map: L1;
* a linear head on the pooled embedding predicts the rotation: cross-entropy;
* a linear projection of the pooled embeddings goes into ``monai.losses.ContrastiveLoss``.

The hole sizes are MONAI's 96^3 values scaled to the crop. ``ContrastiveLoss`` uses the local
batch as negatives (it does not gather across ranks under DDP, unlike the MASS recipe's loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.transforms import RandCoarseDropout, RandCoarseShuffle
from torch import nn

from omnienc.config import JsonConfig
from omnienc.encoders.base import Encoder

# MONAI's tutorial works on 96^3 crops; its hole sizes are given here as fractions of the crop.
_TUTORIAL_CROP = 96.0


@dataclass(frozen=True)
class MonaiSSLConfig(JsonConfig):
    """Config of :class:`MonaiSSLObjective`.

    Attributes:
        inpaint_weight: Weight of the L1 reconstruction loss.
        rotation_weight: Weight of the rotation cross-entropy; 0 switches it off (MONAI's
            tutorial has no rotation loss).
        contrastive_weight: Weight of the contrastive loss.
        temperature: Temperature of ``monai.losses.ContrastiveLoss``, > 0 (the tutorial: 0.05).
        proj_dim: Width of the contrastive projection.
        deconv_chns: Channels between the decoder's two transposed convolutions (MONAI: 16).
        holes: Number of dropout holes per view (MONAI: 6).
        shuffle_holes: Number of shuffled patches per view (MONAI: 10).
        shuffle_prob: Probability of the shuffle corruption (MONAI: 0.8).
    """

    inpaint_weight: float = 1.0
    rotation_weight: float = 1.0
    contrastive_weight: float = 1.0
    temperature: float = 0.05
    proj_dim: int = 128
    deconv_chns: int = 16
    holes: int = 6
    shuffle_holes: int = 10
    shuffle_prob: float = 0.8

    def __post_init__(self) -> None:
        weights = (self.inpaint_weight, self.rotation_weight, self.contrastive_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {weights}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.proj_dim, self.deconv_chns, self.holes, self.shuffle_holes) < 1:
            raise ValueError("proj_dim, deconv_chns, holes and shuffle_holes must be >= 1")
        if not 0.0 <= self.shuffle_prob <= 1.0:
            raise ValueError(f"shuffle_prob must be in [0, 1], got {self.shuffle_prob}")


def turn_axial(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Turn each item by its own multiple of 90 degrees in the axial ``(x, y)`` plane.

    Args:
        x: ``(N, C, S_x, S_y, S_z)`` with ``S_x == S_y``.
        turns: ``(N,)`` ints; item ``i`` is turned ``turns[i]`` times (``torch.rot90``).

    Returns:
        ``(N, C, S_x, S_y, S_z)``, a new tensor.
    """
    return torch.stack([torch.rot90(v, int(k), dims=(1, 2)) for v, k in zip(x, turns, strict=True)])


def require_square_axial(crop_size: Sequence[int], what: str) -> None:
    """Refuse crops whose axial ``(x, y)`` plane is not square: ``what`` turns that plane.

    Raises:
        ValueError: ``crop_size[0] != crop_size[1]``, naming ``what`` and the crop size.
    """
    size = tuple(int(s) for s in crop_size)
    if size[0] != size[1]:
        raise ValueError(
            f"{what} turns the (x, y) plane; crop_size must have equal x and y, got {size}"
        )


def _split_stride(stride: int) -> tuple[int, int]:
    """Split the deepest stride into two upsampling factors, as ``ViTAutoEnc`` does (16 -> 4, 4)."""
    first = 2 ** math.ceil(math.log2(stride) / 2) if stride > 1 else 1
    while stride % first:
        first -= 1
    return first, stride // first


class InpaintingObjective(nn.Module):
    """MONAI's inpainting part alone: corrupt views, reconstruct them from the deepest features.

    The MONAI recipe (:class:`MonaiSSLObjective`) builds on it; the MASS recipe adds its
    :meth:`inpainting_loss` on the reference crops as an auxiliary loss
    (``model.inpaint_weight``).

    Args:
        encoder: The encoder being pretrained (only its ``embed_dim``, input channels and deepest
            stride are read).
        crop_size: ``(S_x, S_y, S_z)`` crops.
        config: Corruption sizes and decoder width (the loss weights are not read here).
    """

    def __init__(
        self, encoder: Encoder, crop_size: tuple[int, int, int], config: MonaiSSLConfig
    ) -> None:
        super().__init__()
        self.config = config
        self.crop_size = tuple(int(s) for s in crop_size)
        stride = int(encoder.feature_info[-1]["reduction"])
        up1, up2 = _split_stride(stride)
        self.decoder = nn.Sequential(
            nn.ConvTranspose3d(encoder.embed_dim, config.deconv_chns, kernel_size=up1, stride=up1),
            nn.ConvTranspose3d(config.deconv_chns, encoder.config.in_chans, up2, stride=up2),
        )
        side = min(self.crop_size)
        scale = side / _TUTORIAL_CROP

        def size(voxels: float) -> int:
            return max(1, min(side, round(voxels * scale)))

        # MONAI's tutorial: OneOf(small noise-filled holes, keep only large holes), then shuffle.
        self._dropouts = (
            RandCoarseDropout(
                holes=config.holes, spatial_size=size(5), max_spatial_size=size(32), prob=1.0
            ),
            RandCoarseDropout(
                holes=config.holes,
                spatial_size=size(20),
                max_spatial_size=size(64),
                dropout_holes=False,
                prob=1.0,
            ),
        )
        self._shuffle = RandCoarseShuffle(
            holes=config.shuffle_holes,
            spatial_size=size(8),
            max_spatial_size=size(8),
            prob=config.shuffle_prob,
        )

    def corrupt(self, views: torch.Tensor, seed: int) -> torch.Tensor:
        """MONAI's corruption of each view: one of the two dropouts, then (maybe) a shuffle.

        Args:
            views: ``(N, C, S_x, S_y, S_z)`` clean views.
            seed: Seeds the dropout choice and MONAI's random transforms.

        Returns:
            ``(N, C, S_x, S_y, S_z)`` corrupted copies (``views`` is not changed).
        """
        generator = torch.Generator().manual_seed(seed)
        for i, t in enumerate((*self._dropouts, self._shuffle)):
            t.set_random_state(seed=(seed + i) % 2**32)
        out = []
        choice = torch.randint(0, 2, (views.shape[0],), generator=generator)
        # MONAI's coarse dropout and shuffle write into their input: corrupt a copy.
        copies = views.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for view, k in zip(copies, choice.tolist(), strict=True):
            out.append(torch.as_tensor(self._shuffle(self._dropouts[k](view))))
        return torch.stack(out).to(device=views.device, dtype=views.dtype)

    def reconstruct(self, feats: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Decode ``(N, E, d, h, w)`` deepest features to ``(N, C, *size)`` voxels."""
        return self.decoder(feats)[(..., *(slice(0, int(s)) for s in size))]

    def inpainting_loss(self, encoder: Encoder, views: torch.Tensor, seed: int) -> torch.Tensor:
        """L1 between the clean views and their reconstruction from corrupted copies.

        Args:
            encoder: The encoder being pretrained.
            views: ``(N, C, S_x, S_y, S_z)`` clean views.
            seed: Seeds the corruptions (see :meth:`corrupt`).

        Returns:
            The scalar L1 loss, computed in float32.
        """
        feats = encoder.forward_features(self.corrupt(views, seed))
        recon = self.reconstruct(feats, views.shape[2:])
        with torch.autocast(device_type=views.device.type, enabled=False):
            return F.l1_loss(recon.float(), views.float())


class MonaiSSLObjective(InpaintingObjective):
    """Decoder, rotation head, projection and the three losses of the MONAI recipe.

    Args:
        encoder: The encoder being pretrained (only its ``embed_dim`` and deepest stride are read).
        crop_size: ``(S, S, S)`` crops; the rotation needs the two in-plane sizes equal.
        config: Weights, temperature and corruption sizes.
    """

    def __init__(
        self, encoder: Encoder, crop_size: tuple[int, int, int], config: MonaiSSLConfig
    ) -> None:
        require_square_axial(crop_size, "the rotation of the MONAI recipe")
        super().__init__(encoder, crop_size, config)
        dim = encoder.embed_dim
        self.rotation_head = nn.Linear(dim, 4)
        self.projection = nn.Linear(dim, config.proj_dim)
        self.contrastive_loss = ContrastiveLoss(temperature=config.temperature)

    def forward(
        self, encoder: Encoder, ref: torch.Tensor, query: torch.Tensor, seed: int
    ) -> dict[str, torch.Tensor]:
        """The three losses on a batch of view pairs.

        Args:
            encoder: The encoder being pretrained.
            ref: ``(B, C, S, S, S)`` first views.
            query: ``(B, C, S, S, S)`` second views of the same volumes.
            seed: Seeds the rotations and corruptions; the training step derives it from the
                run's seed, the global step and the rank, so a resumed run repeats them.

        Returns:
            ``loss`` (weighted sum), ``inpaint`` (L1), ``rotation`` (cross-entropy),
            ``rotation_acc`` and ``contrastive``.
        """
        b = ref.shape[0]
        clean = torch.cat([ref, query])
        rng = torch.Generator().manual_seed(seed)
        turns = torch.randint(0, 4, (clean.shape[0],), generator=rng)
        clean = turn_axial(clean, turns)
        feats = encoder.forward_features(self.corrupt(clean, seed + 1))
        recon = self.reconstruct(feats, clean.shape[2:])
        pooled = feats.mean(dim=(2, 3, 4))
        cfg = self.config
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=clean.device.type, enabled=False):
            inpaint = F.l1_loss(recon.float(), clean.float())
            logits = self.rotation_head(pooled.float())
            target = turns.to(logits.device)
            rotation = F.cross_entropy(logits, target)
            z = self.projection(pooled.float())
            contrastive = self.contrastive_loss(z[:b], z[b:])
        loss = (
            cfg.inpaint_weight * inpaint
            + cfg.rotation_weight * rotation
            + cfg.contrastive_weight * contrastive
        )
        out["loss"] = loss
        out["inpaint"] = inpaint.detach()
        out["rotation"] = rotation.detach()
        out["rotation_acc"] = (logits.argmax(1) == target).float().mean().detach()
        out["contrastive"] = contrastive.detach()
        return out
