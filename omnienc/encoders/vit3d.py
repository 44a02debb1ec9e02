"""3D Vision Transformer encoder built from timm's transformer blocks.

A ViT (Dosovitskiy et al., https://arxiv.org/abs/2010.11929) over non-overlapping 3D patches, as
UNETR does for volumes (https://arxiv.org/abs/2103.10504): a ``Conv3d`` with kernel = stride =
``patch_size`` embeds patches, a learned position embedding is added, and
``timm.models.vision_transformer.Block`` layers follow. There is no class token: the pooled
embedding is the mean of the final-normed patch tokens, like every other omnienc encoder.

Input sizes:

* An input whose size is not a multiple of ``patch_size`` is zero-padded at the high end of each
  axis (after the last voxel) up to the next multiple, so the token grid is
  ``ceil(n / patch_size)`` along each axis, the same rule as the convolutional encoders.
* The position embedding is learned for the grid of ``img_size``; for any other grid it is
  resized by trilinear interpolation (``align_corners=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from omnienc.encoders.base import Encoder, EncoderConfig

NUM_INTERMEDIATES = 4


@dataclass(frozen=True)
class ViT3DConfig(EncoderConfig):
    """Config of :class:`ViT3DEncoder`.

    Attributes:
        in_chans: Input channels.
        img_size: Cube edge the position embedding is learned for; a multiple of ``patch_size``.
        patch_size: Patch edge; also the stride of every feature map.
        embed_dim: Token width ``E``.
        depth: Number of transformer blocks (>= 4, one per intermediate output).
        num_heads: Attention heads; must divide ``embed_dim``.
        mlp_ratio: Hidden width of the MLP as a multiple of ``embed_dim``.
    """

    img_size: int = 64
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1 or self.img_size < self.patch_size:
            raise ValueError(
                f"need 1 <= patch_size <= img_size, got {self.patch_size}, {self.img_size}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.depth < NUM_INTERMEDIATES:
            raise ValueError(f"depth must be >= {NUM_INTERMEDIATES}, got {self.depth}")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide embed_dim {self.embed_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")


class ViT3DEncoder(Encoder):
    """3D ViT encoder; see the module docstring for padding and position embeddings.

    Args:
        config: Sizes of the patch grid and the transformer.
    """

    family = "vit3d"
    config: ViT3DConfig

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.config = config
        p, e = config.patch_size, config.embed_dim
        self.patch_embed = nn.Conv3d(config.in_chans, e, kernel_size=p, stride=p)
        g = config.img_size // p
        self.pos_embed = nn.Parameter(torch.zeros(1, e, g, g, g))
        self.blocks = nn.ModuleList(
            Block(e, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)
        # Four evenly spaced blocks ending with the last one, e.g. depth 12 -> 2, 5, 8, 11.
        n = NUM_INTERMEDIATES
        self.out_indices = [(i + 1) * config.depth // n - 1 for i in range(n)]
        self.embed_dim = e
        self.feature_info = [
            {"num_chs": e, "reduction": p, "module": f"blocks.{i}"} for i in self.out_indices
        ]
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position embedding for a token grid.

        Args:
            grid: Token grid ``(d, h, w)``.

        Returns:
            ``(1, E, d, h, w)``: the learned embedding itself for the ``img_size`` grid, else its
            trilinear resize.
        """
        if tuple(self.pos_embed.shape[2:]) == tuple(grid):
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=grid, mode="trilinear", align_corners=False)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Pad, embed patches and add positions.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            Tokens ``(B, d * h * w, E)`` in ``(d, h, w)`` row-major order, and the grid.
        """
        self.check_input(x)
        p = self.config.patch_size
        pad = [(-n) % p for n in x.shape[2:]]
        if any(pad):
            # F.pad lists the last axis first: (W_low, W_high, H_low, H_high, D_low, D_high).
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        x = self.patch_embed(x)
        d, h, w = x.shape[2:]
        x = x + self.position_embedding((d, h, w))
        return x.flatten(2).transpose(1, 2), (d, h, w)

    @staticmethod
    def _to_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(B, N, E)`` tokens -> ``(B, E, d, h, w)`` map."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of four evenly spaced blocks (``out_indices``); the last one final-normed.

        The last entry equals :meth:`forward_features`, as for every family, so one pass can
        serve both a decoder and a pooled embedding.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            Four tensors ``(B, E, ceil(D / p), ceil(H / p), ceil(W / p))``, ``p = patch_size``.
        """
        tokens, grid = self._embed(x)
        out = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.out_indices:
                is_last = i == self.out_indices[-1]
                out.append(self._to_grid(self.norm(tokens) if is_last else tokens, grid))
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens on their grid.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, E, ceil(D / p), ceil(H / p), ceil(W / p))``, ``p = patch_size``.
        """
        tokens, grid = self._embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self._to_grid(self.norm(tokens), grid)


def _init_linear(m: nn.Module) -> None:
    # timm's ViT initialisation for linear layers.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


VIT3D_SIZES: dict[str, ViT3DConfig] = {
    "vit3d_tiny": ViT3DConfig(embed_dim=192, depth=6, num_heads=3, patch_size=16),
    "vit3d_small": ViT3DConfig(embed_dim=384, depth=12, num_heads=6, patch_size=16),
}
