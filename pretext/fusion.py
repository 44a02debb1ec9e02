"""Fusion parts of the in-context head: 3D position encodings, attention, the two-way block.

The in-context head (:mod:`omnienc.pretext.incontext`) fuses task tokens with query features by
the two-way transformer of SAM's mask decoder (Kirillov et al., "Segment Anything",
https://arxiv.org/abs/2304.02643). Its parts live here:

* :func:`sinusoidal_position_encoding_3d`: fixed 3D sine/cosine encodings of a feature grid;
* :class:`Attention`, :class:`TwoWayBlock`: multi-head attention and the two-way block;
* :func:`mlp` and :func:`upsample_stride`: the small MLP and the stride-aware upsampling the
  head uses for its logits;
* :class:`TaskConvDecoder`: a small per-task convolutional refinement of the logits (the
  head's ``decoder: conv``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_position_encoding_3d(
    grid: Sequence[int], stride: int, dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 3D sine/cosine position encoding of a feature grid, in input-voxel units.

    Each axis gets ``2 * ceil(dim / 6)`` channels, ``sin`` and ``cos`` of the voxel-centre
    coordinate ``(i + 0.5) * stride - 0.5`` at frequencies ``10000 ** (-k / n)`` (Vaswani et
    al., https://arxiv.org/abs/1706.03762); the three are concatenated and cut to ``dim``.
    Using input voxels makes grids of different strides agree on where a position is.

    Args:
        grid: ``(d, h, w)``.
        stride: Input voxels per grid cell.
        dim: Channels.
        device: Where to make it.

    Returns:
        ``(d * h * w, dim)`` float32, rows in ``(d, h, w)`` row-major order.
    """
    n = math.ceil(dim / 6)
    freqs = 10000.0 ** (-torch.arange(n, dtype=torch.float32, device=device) / n)
    axes = [
        (torch.arange(g, dtype=torch.float32, device=device) + 0.5) * stride - 0.5 for g in grid
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    angles = coords[:, :, None] * freqs  # (L, 3, n)
    pe = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(coords.shape[0], -1)
    return pe[:, :dim]


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value inputs (as in SAM's decoder).

    Args:
        dim: Token width.
        num_heads: Heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend from ``q`` to ``k``/``v``.

        Args:
            q: ``(N, Lq, dim)``.
            k: ``(N, Lk, dim)``.
            v: ``(N, Lk, dim)``.

        Returns:
            ``(N, Lq, dim)``.
        """
        n, lq, dim = q.shape
        h = self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # (N, L, dim) -> (N, h, L, dim / h)
            return x.reshape(n, x.shape[1], h, dim // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, dim))


def mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class TwoWayBlock(nn.Module):
    """One fusion block of SAM's two-way transformer (https://arxiv.org/abs/2304.02643).

    Task-token self-attention, task-token-to-query cross-attention, an MLP on the tokens, then
    query-to-task-token cross-attention that updates the query features; post-norm residuals.
    Position encodings are added to the query-feature keys (and queries), never to values.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.token_to_image = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, max(1, round(dim * mlp_ratio)), dim)
        self.norm3 = nn.LayerNorm(dim)
        self.image_to_token = Attention(dim, num_heads)
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse one task's tokens with its copy of the query features.

        Args:
            tokens: ``(B * T, N, dim)`` task tokens.
            image: ``(B * T, L, dim)`` flattened query features.
            image_pe: ``(L, dim)`` position (and level) encoding of ``image``.

        Returns:
            Updated ``tokens`` ``(B * T, N, dim)`` and ``image`` ``(B * T, L, dim)``.
        """
        tokens = self.norm1(tokens + self.self_attn(tokens, tokens, tokens))
        keys = image + image_pe
        tokens = self.norm2(tokens + self.token_to_image(tokens, keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.image_to_token(keys, tokens, tokens))
        return tokens, image


class TaskConvDecoder(nn.Module):
    """A per-task convolutional refinement of the head's dot-product logits.

    The dot product of a task vector with a shared per-voxel map is linear in the voxel's
    features: every voxel with a large projection on the task direction fires, whether or not it
    resembles the structure. MASS instead decodes every task with its own convolutional decoder.
    This is a light version at the head's output stride: the elementwise product of the
    per-voxel map and the task vector (whose channel sum is the dot product) goes through a
    linear layer (a 1x1 convolution), a depthwise 3x3x3 convolution with group norm and a 1x1
    convolution to one channel, added to the dot-product logits. The last convolution starts
    at zero, so a new head starts as the plain dot product.

    Args:
        dim: Channels of the per-voxel map and the task vector.
        hidden: Channels inside the decoder.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, hidden)
        out = nn.Conv3d(hidden, 1, 1)
        for p in out.parameters():  # weight and bias
            nn.init.zeros_(p)
        self.net = nn.Sequential(
            nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GroupNorm(1, hidden),
            nn.GELU(),
            out,
        )

    def forward(self, pixel: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Refinement logits of every task.

        Args:
            pixel: ``(B, dim, d, h, w)`` per-voxel map.
            task: ``(B, T, dim)`` task vectors.

        Returns:
            ``(B, T, d, h, w)`` logits to add to the dot product's.
        """
        b, t, dim = task.shape
        # inner(pixel * task) without the (B, T, dim, d, h, w) product: fold the task vector
        # into the weights, (W * task) @ pixel.
        weight = self.inner.weight * task[:, :, None, :] / math.sqrt(dim)  # (B, T, hidden, dim)
        x = torch.einsum("bthc,bcxyz->bthxyz", weight, pixel)
        x = x + self.inner.bias[:, None, None, None]
        return self.net(x.flatten(0, 1)).view(b, t, *pixel.shape[2:])


def upsample_stride(x: torch.Tensor, ratio: int, size: Sequence[int]) -> torch.Tensor:
    """Upsample a ``(N, C, *g)`` map by an integer stride ratio, then cut it to ``size``.

    Feature grids are ``ceil(n / stride)`` cells, so ``g * ratio`` covers at least ``size``;
    resizing by the exact ratio keeps cell centres where the encoder put them. When the grid
    does not cover ``size`` (a caller-chosen output larger than the input) it resizes to
    ``size`` directly.

    Args:
        x: ``(N, C, d, h, w)``.
        ratio: Integer upsampling factor.
        size: Target ``(D, H, W)``.

    Returns:
        ``(N, C, *size)``.
    """
    full = [g * ratio for g in x.shape[2:]]
    if any(f < s for f, s in zip(full, size, strict=True)):
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
    if ratio != 1:
        x = F.interpolate(x, size=tuple(full), mode="trilinear", align_corners=False)
    return x[:, :, : size[0], : size[1], : size[2]]
