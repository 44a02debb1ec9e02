"""The contrastive objective on the pooled embeddings of the two crops of a pair.

The reference and query crops of :func:`omnienc.pretext.incontext.sample_pair` overlap, so their
pooled encoder embeddings ``encoder(x) -> (B, E)`` are two views of one volume. A projection
head and a loss from lightly turn them into a second objective beside MASS's in-context
segmentation, so one encoder forward pass serves both:

* ``"ntxent"``: SimCLR (Chen et al., https://arxiv.org/abs/2002.05709), lightly's
  ``SimCLRProjectionHead`` and ``NTXentLoss``;
* ``"vicreg"``: VICReg (Bardes et al., https://arxiv.org/abs/2105.04906), lightly's
  ``VICRegProjectionHead`` and ``VICRegLoss``.

Both losses gather embeddings from every rank under DDP (``gather_distributed=True``); without
``torch.distributed`` they use the local batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import NTXentLoss, VICRegLoss
from lightly.models.modules.heads import SimCLRProjectionHead, VICRegProjectionHead
from torch import nn

from omnienc.config import JsonConfig

KINDS = ("ntxent", "vicreg")


@dataclass(frozen=True)
class ContrastiveConfig(JsonConfig):
    """Config of :class:`ContrastiveObjective`.

    Attributes:
        kind: ``"ntxent"`` (SimCLR) or ``"vicreg"``.
        hidden_dim: Hidden width of the projection head.
        proj_dim: Output width of the projection head.
        temperature: NT-Xent temperature (unused by VICReg), > 0.
    """

    kind: str = "ntxent"
    hidden_dim: int = 256
    proj_dim: int = 128
    temperature: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.hidden_dim < 1 or self.proj_dim < 1:
            raise ValueError(
                f"hidden_dim and proj_dim must be >= 1, got {self.hidden_dim}, {self.proj_dim}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class ContrastiveObjective(nn.Module):
    """Projection head + contrastive loss on the pooled embeddings of the two views.

    Args:
        embed_dim: ``E``, the encoder's pooled embedding width.
        config: Loss kind and head sizes.

    Attributes:
        head: lightly's projection head for ``config.kind`` (BatchNorm inside, 2 layers for
            SimCLR, 3 for VICReg).
        criterion: lightly's loss for ``config.kind``.
    """

    def __init__(self, embed_dim: int, config: ContrastiveConfig | None = None) -> None:
        super().__init__()
        config = config or ContrastiveConfig()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.config = config
        self.embed_dim = embed_dim
        self.head: nn.Module
        self.criterion: nn.Module
        if config.kind == "ntxent":
            self.head = SimCLRProjectionHead(embed_dim, config.hidden_dim, config.proj_dim)
            self.criterion = NTXentLoss(temperature=config.temperature, gather_distributed=True)
        else:
            self.head = VICRegProjectionHead(embed_dim, config.hidden_dim, config.proj_dim)
            self.criterion = VICRegLoss(gather_distributed=True)

    def forward(self, z_ref: torch.Tensor, z_query: torch.Tensor) -> torch.Tensor:
        """Project both views and compute the loss.

        The head runs in the ambient precision; the loss runs in float32 with autocast off (as
        dinov2 does for its fragile losses).

        Args:
            z_ref: ``(B, E)`` pooled embeddings of the reference crops.
            z_query: ``(B, E)`` pooled embeddings of the query crops; row ``i`` is the second
                view of row ``i`` of ``z_ref``.

        Returns:
            The scalar loss.

        Raises:
            ValueError: The shapes differ or are not ``(B, E)``, or ``B < 2``: NT-Xent has no
                negative and VICReg no variance with one sample, and the head's BatchNorm
                cannot normalise one sample in training.
        """
        if z_ref.shape != z_query.shape or z_ref.ndim != 2 or z_ref.shape[1] != self.embed_dim:
            raise ValueError(
                f"z_ref and z_query must both be (B, {self.embed_dim}), got "
                f"{tuple(z_ref.shape)} and {tuple(z_query.shape)}"
            )
        if z_ref.shape[0] < 2:
            raise ValueError(
                f"the {self.config.kind} contrastive loss needs at least 2 samples per batch "
                f"(per device), got {z_ref.shape[0]}"
            )
        p_ref, p_query = self.head(z_ref), self.head(z_query)
        with torch.autocast(device_type=z_ref.device.type, enabled=False):
            loss: torch.Tensor = self.criterion(p_ref.float(), p_query.float())
        return loss
