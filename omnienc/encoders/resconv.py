"""Residual convolutional 3D encoder with instance normalisation (the omnienc default).

It is the encoder half of the 3D residual UNet that MASS pretrains ("Learning Generalizable 3D
Medical Image Representations from Mask-Guided Self-Supervision", https://arxiv.org/abs/2603.13660),
laid out like nnU-Net's residual encoder: conv3x3x3 -> InstanceNorm3d(affine) -> LeakyReLU.

Layout (``w_i = widths[i]``, ``n_i = depths[i]``)::

    stem      conv3x3x3 stride 2, C -> w_0, IN, LeakyReLU             stride 2
    stages.0  n_0 residual blocks at w_0                              stride 2
    stages.i  residual block stride 2 (w_{i-1} -> w_i) + n_i - 1 more  stride 2^(i+1), i = 1..3

so the deepest stage has stride 16 (= ``omnienc.lifting.LIFT_DEPTH``). ``resconv_mass`` is the
GPU layout MASS trains (five stages of widths 32-512 and an unstrided stem, ``stem_stride=1``):
``stem`` at stride 1, then ``stages.0`` at 1 and ``stages.i`` at ``2^i``, again 16 at the
deepest. The default stem is strided
because the full-resolution stage of a UNet encoder dominates CPU time (for a 32^3 crop a
stride-1 stem would do 8x the work of stage 0 and keep the largest activations for backward);
a decoder that needs full-resolution detail can take it from the input itself.

A residual block is ``act(IN(conv(act(IN(conv(x))))) + shortcut(x))``; when it downsamples or
changes width the shortcut is average-pool (stride 2) -> conv1x1 -> IN (ResNet-D), so the skip
path sees every voxel. Every convolution pads by one voxel and every stride-2 step maps a size
``n`` to ``ceil(n / 2)``, so any input size works (28^3 gives 14, 7, 4, 2) and a stage with
stride ``r`` has ``ceil(n / r)`` voxels along each axis. Instance normalisation needs more than
one voxel per channel, so the deepest grid must not be ``1 x 1 x 1`` (a 16^3 cube is refused;
17^3, 32^3 and lifted 2D images ``16 x H x W`` with ``H > 16`` are fine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from omnienc.encoders.base import Encoder, EncoderConfig

NUM_STAGES = 4
TOTAL_STRIDE = 16  # of the deepest stage, for every layout (omnienc.lifting.LIFT_DEPTH)


@dataclass(frozen=True)
class ResConvConfig(EncoderConfig):
    """Config of :class:`ResConvEncoder`.

    Attributes:
        in_chans: Input channels.
        widths: Channels of the stages; the last is ``embed_dim``.
        depths: Residual blocks per stage (each >= 1).
        negative_slope: Slope of the LeakyReLU (0.01 as in nnU-Net).
        stem_stride: Stride of the stem, 2 (four stages) or 1 (five stages, the first at full
            resolution, as MASS and nnU-Net lay out theirs); the deepest stride is 16 either way.
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    negative_slope: float = 0.01
    stem_stride: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        stages = NUM_STAGES + (2 - self.stem_stride)
        if len(self.widths) != stages or len(self.depths) != stages:
            raise ValueError(
                f"widths and depths need {stages} entries with stem_stride {self.stem_stride} "
                f"(total stride {TOTAL_STRIDE}), got widths={self.widths}, depths={self.depths}"
            )
        if min(self.widths) < 1 or min(self.depths) < 1:
            raise ValueError(f"widths and depths must be >= 1, got {self.widths}, {self.depths}")
        if self.negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {self.negative_slope}")


class ResBlock(nn.Module):
    """Two conv3x3x3-IN layers with a residual connection.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: 1, or 2 to halve every spatial axis (``n -> ceil(n / 2)``).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, negative_slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_chs, affine=True)
        self.conv2 = nn.Conv3d(out_chs, out_chs, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_chs, affine=True)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            pool: nn.Module = nn.Identity()
            if stride != 1:
                pool = nn.AvgPool3d(stride, stride, ceil_mode=True, count_include_pad=False)
            self.shortcut = nn.Sequential(
                pool,
                nn.Conv3d(in_chs, out_chs, 1, bias=False),
                nn.InstanceNorm3d(out_chs, affine=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``(B, in_chs, D, H, W)``.

        Returns:
            ``(B, out_chs, ceil(D / s), ceil(H / s), ceil(W / s))`` for stride ``s``.
        """
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResConvEncoder(Encoder):
    """MASS-style residual convolutional encoder; see the module docstring for the layout.

    Args:
        config: Widths, depths and input channels.
    """

    family = "resconv"
    config: ResConvConfig

    def __init__(self, config: ResConvConfig) -> None:
        super().__init__()
        self.config = config
        w, slope = config.widths, config.negative_slope
        self.stem = nn.Sequential(
            nn.Conv3d(config.in_chans, w[0], 3, stride=config.stem_stride, padding=1, bias=False),
            nn.InstanceNorm3d(w[0], affine=True),
            nn.LeakyReLU(slope, inplace=True),
        )
        stages = []
        for i, (width, depth) in enumerate(zip(w, config.depths, strict=True)):
            prev, stride = (w[0], 1) if i == 0 else (w[i - 1], 2)
            blocks = [ResBlock(prev, width, stride, slope)]
            blocks += [ResBlock(width, width, 1, slope) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.embed_dim = w[-1]
        self.feature_info = [
            {"num_chs": width, "reduction": config.stem_stride * 2**i, "module": f"stages.{i}"}
            for i, width in enumerate(w)
        ]

    def check_input(self, x: torch.Tensor) -> None:
        """As :meth:`Encoder.check_input`, and the deepest grid must have more than one voxel."""
        super().check_input(x)
        r = self.feature_info[-1]["reduction"]
        deepest = [math.ceil(n / r) for n in x.shape[2:]]
        if math.prod(deepest) < 2:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} gives a 1x1x1 grid at stride {r}, "
                "where instance normalisation is undefined; make at least one axis larger "
                f"than {r} voxels"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the stages.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            One tensor per stage, ``(B, widths[i], ceil(D / r_i), ceil(H / r_i), ceil(W / r_i))``
            with ``r_i = stem_stride * 2^i`` (``2^(i+1)`` for the default stem).
        """
        self.check_input(x)
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, widths[-1], ceil(D / 16), ceil(H / 16), ceil(W / 16))``.
        """
        return self.forward_intermediates(x)[-1]


RESCONV_SIZES: dict[str, ResConvConfig] = {
    "resconv_tiny": ResConvConfig(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
    "resconv_small": ResConvConfig(widths=(16, 32, 64, 128), depths=(1, 1, 2, 2)),
    "resconv_base": ResConvConfig(widths=(32, 64, 128, 256), depths=(1, 2, 2, 2)),
    "resconv_mass": ResConvConfig(
        widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 2, 2), stem_stride=1
    ),
}
