"""The encoder contract every architecture family implements.

An encoder maps a volume batch ``(B, C, D, H, W)`` to

* ``forward_intermediates(x)``: feature maps ``(B, C_i, D_i, H_i, W_i)``, shallow to deep, one per
  entry of ``feature_info`` (channels ``num_chs``, stride ``reduction``, and the ``module`` that
  makes it). ``D_i = ceil(D / reduction)`` (likewise ``H_i``, ``W_i``) for every family;
* ``forward_features(x)``: the deepest feature map ``(B, embed_dim, d, h, w)``;
* ``forward(x)``: the pooled embedding ``(B, embed_dim)``, the global average of
  ``forward_features(x)`` over ``(d, h, w)``.

There is no task head and no flag that changes what a method returns. Each family has a small
frozen config dataclass (subclass of :class:`EncoderConfig`) that a checkpoint stores as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from omnienc.config import JsonConfig, config_from_dict

C = TypeVar("C", bound="EncoderConfig")


@dataclass(frozen=True)
class EncoderConfig(JsonConfig):
    """Fields every encoder config has; families subclass it.

    Attributes:
        in_chans: Number of input channels ``C``.
    """

    in_chans: int = 1

    def __post_init__(self) -> None:
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")

    def replace(self: C, **overrides: Any) -> C:
        """Return a copy with some fields changed.

        Raises:
            ValueError: A key is unknown or a value is invalid.
        """
        return config_from_dict(type(self), {**self.to_dict(), **overrides})


class Encoder(nn.Module):
    """Base class of every omnienc encoder (see the module docstring for the contract).

    Subclasses set ``family`` and, in ``__init__``, ``config``, ``embed_dim`` and
    ``feature_info``, and implement :meth:`forward_intermediates` and :meth:`forward_features`.

    Attributes:
        family: Name of the architecture family, the key of ``omnienc.encoders.FAMILIES``.
        config: The frozen config the encoder was built from.
        embed_dim: Channels ``E`` of the deepest feature map and of the pooled embedding.
        feature_info: One dict per intermediate feature map, shallow to deep, with keys
            ``num_chs`` (channels), ``reduction`` (stride w.r.t. the input) and ``module``.
    """

    family: ClassVar[str] = ""
    config: EncoderConfig
    embed_dim: int
    feature_info: list[dict[str, Any]]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a float ``(B, C, D, H, W)`` batch it can encode.

        Args:
            x: The input batch.
        """
        c = self.config.in_chans
        if x.ndim != 5 or x.shape[1] != c:
            raise ValueError(
                f"{type(self).__name__} expects a (B, C, D, H, W) batch with C={c}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects a float tensor, got {x.dtype}")
        if min(x.shape) < 1:
            raise ValueError(f"{type(self).__name__} got an empty batch of shape {tuple(x.shape)}")

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at every level of ``feature_info``.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            One ``(B, num_chs_i, ceil(D / r_i), ceil(H / r_i), ceil(W / r_i))`` tensor per entry of
            ``feature_info`` (``r_i`` its ``reduction``), shallow to deep.
        """
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest feature map.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, embed_dim, d, h, w)`` with ``d = ceil(D / r)`` for the deepest reduction ``r``.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding: the global average of :meth:`forward_features`.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``(B, embed_dim)``.
        """
        return self.forward_features(x).mean(dim=(2, 3, 4))
