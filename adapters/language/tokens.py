"""Frozen-encoder tokens of paired volumes, computed once and cached for alignment.

:func:`encode_tokens` runs the frozen encoder over every item of a paired dataset and keeps the
deepest feature map as tokens ``(N, E)`` with their 3D grid positions (:class:`TokenSet`);
:func:`collate_tokens` batches them for the projector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.embed import encoder_input
from omnienc.encoders import RANDOM_PREFIX, arch_name, parse_random_spec, random_encoder
from omnienc.encoders.base import Encoder
from omnienc.preprocessing import Preprocessing

# -------------------------------------------------------------------- frozen encoder tokens


def state_fingerprint(module: nn.Module) -> str:
    """``sha256:HEX`` of a module's state dict (names, dtypes, shapes and values).

    Two encoders with equal weights get the same fingerprint however they were saved or built.
    """
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def load_encoder_spec(spec: str | Path) -> tuple[Encoder, Preprocessing, dict[str, Any]]:
    """An encoder from a checkpoint folder or ``random:ARCH[:SEED]``, frozen, with its facts.

    Returns:
        ``(encoder, preprocessing, info)``; ``info`` holds ``source``, ``fingerprint``
        (:func:`state_fingerprint`), ``arch``, ``embed_dim`` and the checkpoint's ``meta``.

    Raises:
        CheckpointError: The folder is not a loadable encoder checkpoint.
        ValueError: Unknown architecture in ``random:ARCH``.
    """
    text = str(spec)
    parsed = parse_random_spec(text)
    if parsed is not None:
        arch, seed = parsed[0], parsed[1] or 0
        encoder = random_encoder(arch, seed)
        pre, meta = Preprocessing(), {"random_init": f"{RANDOM_PREFIX}{arch}:{seed}"}
    else:
        encoder, pre = load_encoder(spec)
        meta = load_checkpoint_config(spec).get("meta") or {}
    encoder.requires_grad_(False).eval()
    info = {
        "source": text,
        "fingerprint": state_fingerprint(encoder),
        "arch": arch_name(encoder),
        "embed_dim": encoder.embed_dim,
        "meta": meta,
    }
    return encoder, pre, info


def grid_positions(grid: Sequence[int]) -> torch.Tensor:
    """Centres of a ``(d, h, w)`` token grid in ``[-1, 1]``, raster order: ``(d h w, 3)``."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass
class TokenSet(Dataset[dict[str, Any]]):
    """Frozen encoder tokens of paired items, with their texts.

    Attributes:
        tokens: Per item ``(N_i, E)`` float32: the deepest feature map flattened in raster order.
        positions: Per item ``(N_i, 3)`` token-grid centres in ``[-1, 1]``.
        texts: Per item text.
        ids: Per item id.
        metas: Per item ``meta`` of the paired dataset.
    """

    tokens: list[torch.Tensor]
    positions: list[torch.Tensor]
    texts: list[str]
    ids: list[str]
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": self.tokens[i], "positions": self.positions[i], "text": self.texts[i]}

    def subset(self, rows: Sequence[int]) -> TokenSet:
        """The items at ``rows``, in that order."""
        return TokenSet(
            [self.tokens[i] for i in rows],
            [self.positions[i] for i in rows],
            [self.texts[i] for i in rows],
            [self.ids[i] for i in rows],
            [self.metas[i] for i in rows] if self.metas else [],
        )


@torch.inference_mode()
def volume_tokens(encoder: Encoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of a batch of same-shape volumes.

    Args:
        encoder: The frozen encoder.
        images: ``(B, C, X, Y, Z)`` preprocessed volumes.

    Returns:
        ``(tokens (B, N, E), positions (N, 3))`` from the deepest feature map ``(B, E, d, h, w)``.
    """
    maps = encoder.forward_features(encoder_input(encoder, images)).float().cpu()
    return maps.flatten(2).transpose(1, 2).contiguous(), grid_positions(maps.shape[2:])


def encode_tokens(
    encoder: Encoder,
    dataset: Dataset[dict[str, Any]],
    batch_size: int = 32,
    progress: bool = False,
) -> TokenSet:
    """Run the frozen encoder once over a paired dataset and keep its tokens.

    Consecutive items of the same shape are encoded together, ``batch_size`` at a time.

    Args:
        encoder: The frozen encoder (put in eval mode).
        dataset: Items ``{"image": (C, X, Y, Z), "text", "id", "meta"}``.
        batch_size: Volumes per forward pass.
        progress: Show a progress bar.
    """
    encoder.eval()
    out = TokenSet([], [], [], [], [])
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        tokens, pos = volume_tokens(encoder, torch.stack([p["image"] for p in pending]))
        for p, t in zip(pending, tokens, strict=True):
            out.tokens.append(t.clone())
            out.positions.append(pos)
            out.texts.append(p["text"])
            out.ids.append(p["id"])
            out.metas.append(dict(p.get("meta") or {}))
        pending.clear()

    n = len(dataset)  # type: ignore[arg-type]
    for i in tqdm(range(n), desc="encoder tokens", disable=not progress, unit="item"):
        item = dataset[i]
        if pending and (
            len(pending) >= batch_size or pending[0]["image"].shape != item["image"].shape
        ):
            flush()
        pending.append(item)
    flush()
    return out


def collate_tokens(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`TokenSet` items to a batch.

    Returns:
        ``{"tokens": (B, N, E), "positions": (B, N, 3), "mask": (B, N) bool (True: a real
        token), "text": list of B strings}`` with ``N`` the longest item's token count.
    """
    n = max(int(it["tokens"].shape[0]) for it in items)
    e = int(items[0]["tokens"].shape[1])
    tokens = torch.zeros(len(items), n, e)
    positions = torch.zeros(len(items), n, 3)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        k = int(it["tokens"].shape[0])
        tokens[b, :k], positions[b, :k], mask[b, :k] = it["tokens"], it["positions"], True
    return {
        "tokens": tokens,
        "positions": positions,
        "mask": mask,
        "text": [i["text"] for i in items],
    }
