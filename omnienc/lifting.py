"""The one rule that turns 2D images into thin volumes for the 3D encoder.

A 2D image ``(B, C, H, W)`` becomes ``(B, C, LIFT_DEPTH, H, W)`` by repeating it ``LIFT_DEPTH``
times along depth (depth replication, as RadFM does for 2D scans,
https://arxiv.org/abs/2308.02463). ``LIFT_DEPTH`` is 16, the coarsest stride of every registered
encoder, so the deepest feature map keeps exactly one slice and a 2D image never needs a second
encoder. RGB images (``C == 3``) are first turned to luminance, because the encoder takes one
channel.
"""

from __future__ import annotations

import torch

LIFT_DEPTH = 16

# ITU-R BT.601 luma weights, as PIL's "L" conversion uses.
_LUMA = (0.299, 0.587, 0.114)


def to_single_channel(x: torch.Tensor) -> torch.Tensor:
    """Turn an RGB batch into luminance; pass one-channel input through.

    Args:
        x: ``(B, C, H, W)`` with ``C`` in ``{1, 3}``.

    Returns:
        ``(B, 1, H, W)``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def lift_2d(x: torch.Tensor, depth: int = LIFT_DEPTH) -> torch.Tensor:
    """Lift a 2D batch to a thin volume by depth replication.

    Args:
        x: ``(B, C, H, W)`` images, ``C`` in ``{1, 3}``.
        depth: Number of slices; keep the default unless you know why.

    Returns:
        ``(B, 1, depth, H, W)``; the same image in every slice.
    """
    x = to_single_channel(x)
    return x.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()
