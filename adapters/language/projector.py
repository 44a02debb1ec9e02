"""The language adapter's projectors: frozen-encoder tokens -> prefix embeddings of a causal LM.

The frozen encoder's deepest feature map ``(E, d, h, w)`` of a volume, flattened to ``N = d h w``
tokens ``(N, E)``, goes through a trained projector to ``P`` prefix embeddings ``(P, H)`` in the
language model's input space. This is the LLaVA recipe (Liu et al.,
https://arxiv.org/abs/2304.08485) with a frozen LM, and ClipCap's prefix (Mokady et al.,
https://arxiv.org/abs/2111.09734). Two projectors (:data:`PROJECTORS`, the name -> class dict
:func:`build_projector` reads):

* ``mlp``: the mean of the tokens through a 2-layer MLP to ``P x H`` values, as ClipCap's MLP
  mapping network (M3D, https://arxiv.org/abs/2404.00578, pools 3D ViT tokens before its MLP);
* ``resampler``: ``P`` learned queries cross-attend to the tokens (plus their 3D positions), a
  Perceiver resampler as in Flamingo (https://arxiv.org/abs/2204.14198); it takes any ``N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from omnienc.config import JsonConfig

# ----------------------------------------------------------------------------------- projectors


@dataclass(frozen=True)
class ProjectorConfig(JsonConfig):
    """The projector from encoder tokens to prefix embeddings.

    Attributes:
        kind: A key of :data:`PROJECTORS`: ``mlp`` or ``resampler``.
        num_prefix: Prefix embeddings ``P``.
        width: Hidden width of the MLP, or the resampler's working width.
        depth: Cross-attention layers of the resampler.
        num_heads: Attention heads of the resampler (must divide ``width``).
        dropout: Dropout inside the projector while training.
    """

    config_name = "projector config"

    kind: str = "resampler"
    num_prefix: int = 8
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise ValueError(f"unknown projector kind {self.kind!r}; known: {sorted(PROJECTORS)}")
        if min(self.num_prefix, self.width, self.depth, self.num_heads) < 1:
            raise ValueError("num_prefix, width, depth and num_heads must be >= 1")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide width {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, N, E)`` over the tokens where ``mask`` ``(B, N)`` is True: ``(B, E)``."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class Projector(nn.Module):
    """Base of the projectors: ``(B, N, E)`` tokens -> ``(B, P, H)`` prefix embeddings.

    Inputs are standardised per channel with statistics of the training items
    (:meth:`fit_input_stats`; the identity until fitted), kept as buffers so that they are
    exported with the weights: the tokens with the mean and SD of all training tokens, and the
    item's mean token with the mean and SD of the training items' mean tokens. The second matters:
    a frozen encoder's pooled features can differ between items by about 1% of their scale (the
    shipped encoder on AdrenalMNIST3D), which a linear probe only uses after standardising them.

    Args:
        config: The projector config.
        in_dim: Token width ``E``.
        out_dim: The LM's hidden size ``H``.
    """

    token_mean: torch.Tensor
    token_std: torch.Tensor
    pooled_mean: torch.Tensor
    pooled_std: torch.Tensor

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config, self.in_dim, self.out_dim = config, int(in_dim), int(out_dim)
        self.register_buffer("token_mean", torch.zeros(in_dim))
        self.register_buffer("token_std", torch.ones(in_dim))
        self.register_buffer("pooled_mean", torch.zeros(in_dim))
        self.register_buffer("pooled_std", torch.ones(in_dim))

    @torch.no_grad()
    def fit_input_stats(self, tokens: Sequence[torch.Tensor]) -> None:
        """Set the standardisation from training items' tokens (each ``(N_i, E)``)."""
        every = torch.cat([t.float() for t in tokens])
        pooled = torch.stack([t.float().mean(dim=0) for t in tokens])
        for name, x in (("token", every), ("pooled", pooled)):
            getattr(self, f"{name}_mean").copy_(x.mean(dim=0))
            getattr(self, f"{name}_std").copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6))

    def standardise(
        self, tokens: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, N, E), pooled (B, E))``, both standardised; padding is left out of the
        mean."""
        pooled = (_masked_mean(tokens, mask) - self.pooled_mean) / self.pooled_std
        return (tokens - self.token_mean) / self.token_std, pooled

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix embeddings ``(B, P, H)`` of ``tokens`` ``(B, N, E)``; ``mask`` ``(B, N)`` is
        True for real tokens (``None``: all), ``positions`` ``(B, N, 3)`` in ``[-1, 1]``."""
        raise NotImplementedError


class MLPProjector(Projector):
    """Standardised mean of the tokens -> Linear -> GELU -> Linear -> ``P`` prefix embeddings.

    Args:
        config: The projector config (``num_prefix``, ``width``, ``dropout``).
        in_dim: Token width ``E``.
        out_dim: The LM's hidden size ``H``.
    """

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config, in_dim, out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.width),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.width, config.num_prefix * out_dim),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix embeddings.

        Args:
            tokens: ``(B, N, E)``.
            mask: ``(B, N)`` bool, True for real tokens (padding is False), or ``None``.
            positions: Unused (the mean has no position).

        Returns:
            ``(B, P, H)``.
        """
        _, pooled = self.standardise(tokens, mask)
        return self.mlp(pooled).view(tokens.shape[0], self.config.num_prefix, self.out_dim)


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention of queries to tokens, then a feed-forward layer, both residual."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class ResamplerProjector(Projector):
    """``P`` learned queries cross-attend to the tokens (Perceiver resampler, Flamingo).

    Standardised tokens are mapped to ``width`` and their 3D positions, when given, added through
    a linear map; the standardised mean token, mapped likewise, joins them as one more key (a
    global token). ``depth`` blocks of cross-attention + feed-forward update the queries, and a
    final LayerNorm + Linear maps them to the LM's hidden size.

    Args:
        config: The projector config.
        in_dim: Token width ``E``.
        out_dim: The LM's hidden size ``H``.
    """

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(config, in_dim, out_dim)
        w = config.width
        self.inp = nn.Linear(in_dim, w)
        self.glob = nn.Linear(in_dim, w)
        self.pos = nn.Linear(3, w)
        self.queries = nn.Parameter(torch.randn(config.num_prefix, w) * 0.02)
        self.blocks = nn.ModuleList(
            _CrossAttentionBlock(w, config.num_heads, config.dropout) for _ in range(config.depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, out_dim))

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix embeddings.

        Args:
            tokens: ``(B, N, E)``.
            mask: ``(B, N)`` bool, True for real tokens, or ``None`` (all real).
            positions: ``(B, N, 3)`` token positions in ``[-1, 1]``, or ``None``.

        Returns:
            ``(B, P, H)``.
        """
        std_tokens, pooled = self.standardise(tokens, mask)
        kv = self.inp(std_tokens)
        if positions is not None:
            kv = kv + self.pos(positions.to(kv.dtype))
        kv = torch.cat([self.glob(pooled).unsqueeze(1), kv], dim=1)  # (B, 1 + N, width)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pad = None
        if mask is not None:
            pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        for block in self.blocks:
            q = block(q, kv, pad)
        return self.out(q)


PROJECTORS: dict[str, type[Projector]] = {"mlp": MLPProjector, "resampler": ResamplerProjector}


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    """The projector ``config.kind`` from tokens of width ``in_dim`` to LM width ``out_dim``."""
    return PROJECTORS[config.kind](config, in_dim, out_dim)
