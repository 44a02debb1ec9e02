"""Language adapter: a projector from the frozen encoder into a frozen causal language model.

The frozen encoder's deepest feature map ``(E, d, h, w)`` of a volume, flattened to ``N = d h w``
tokens ``(N, E)``, goes through a trained projector to ``P`` prefix embeddings ``(P, H)`` in the
language model's input space; the prefix is prepended to the embedded prompt and text, and only
the projector learns, by the language-modelling loss on the text tokens (prefix and prompt are
masked). This is the LLaVA recipe (Liu et al., https://arxiv.org/abs/2304.08485) with a frozen
LM, and ClipCap's prefix (Mokady et al., https://arxiv.org/abs/2111.09734). Two projectors
(:data:`PROJECTORS`):

* ``mlp``: the mean of the tokens through a 2-layer MLP to ``P x H`` values, as ClipCap's MLP
  mapping network (M3D, https://arxiv.org/abs/2404.00578, pools 3D ViT tokens before its MLP);
* ``resampler``: ``P`` learned queries cross-attend to the tokens (plus their 3D positions), a
  Perceiver resampler as in Flamingo (https://arxiv.org/abs/2204.14198); it takes any ``N``.

Any model that ``transformers.AutoModelForCausalLM`` loads from a local folder works; it stays
frozen and in eval mode. A sequence is ``[prefix P][bos][prompt][ text][eos]``. LoRA on the LM
(peft) is not offered: peft is not installed here, and the question measured (does image
information pass through the projector?) is asked of a frozen LM.

Training (:func:`align`, ``omnienc align --config ...``) is a Lightning run over cached encoder
tokens; it exports the frozen encoder and the projector side by side::

    RUN_DIR/encoder/     the frozen encoder (omnienc checkpoint)
    RUN_DIR/projector/   projector.safetensors + config.json (kind, sizes, prompt, and the
                         fingerprints of the encoder and LM it was trained with)

:func:`describe` (``omnienc describe CKPT VOLUME --lm PATH``) generates text for a volume.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from omnienc.adapters.language_data import (
    PairedDataConfig,
    TokenSet,
    collate_tokens,
    encode_tokens,
    load_encoder_spec,
    paired_dataset,
    volume_tokens,
)
from omnienc.atomic import atomic_target, write_bytes_atomic
from omnienc.checkpoint import file_sha256, save_encoder
from omnienc.config import JsonConfig, trainer_config_parser
from omnienc.encoders import RANDOM_PREFIX
from omnienc.encoders.base import Encoder
from omnienc.errors import CheckpointError
from omnienc.io import read_volume
from omnienc.optim import adamw_warmup_cosine, decay_groups
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

logger = logging.getLogger("omnienc")

DEFAULT_PROMPT = "Report:"
PROJECTOR_FORMAT = "omnienc-projector"
PROJECTOR_FORMAT_VERSION = 1
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "config.json"
LM_WEIGHT_SUFFIXES = (".safetensors", ".bin")


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


# ------------------------------------------------------------------------------ language models


def lm_fingerprint(folder: str | Path) -> str:
    """``sha256:HEX`` over the names and sha256 of an LM folder's weight files."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(LM_WEIGHT_SUFFIXES))
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def load_causal_lm(path: str | Path) -> tuple[nn.Module, Any]:
    """A frozen causal LM and its tokenizer from a local Hugging Face folder.

    Args:
        path: A folder with ``config.json``, weights and tokenizer files, as ``save_pretrained``
            writes them.

    Returns:
        ``(model, tokenizer)``; the model has ``requires_grad=False`` and is in eval mode.

    Raises:
        CheckpointError: The folder is missing, not a Hugging Face model folder, cannot be loaded
            by ``AutoModelForCausalLM``/``AutoTokenizer``, or its tokenizer has no eos token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "language model folder does not exist")
    if not path.is_dir():
        raise CheckpointError(
            path,
            "is not a folder; pass a Hugging Face model folder (config.json, weights, "
            "tokenizer files)",
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(path, "config.json is missing: not a Hugging Face model folder")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError)
        raise CheckpointError(
            path, f"AutoModelForCausalLM cannot load it: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(
            path, f"AutoTokenizer cannot load its tokenizer: {type(exc).__name__}: {exc}"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise CheckpointError(path, "its tokenizer has no eos token to end a text with")
    model.requires_grad_(False).eval()
    return model, tokenizer


class VisionLanguageModel(nn.Module):
    """Projector + frozen causal LM: prefix embeddings condition the LM's text.

    A sequence is ``[prefix (P)][bos][prompt][ text][eos]`` (``bos`` is the tokenizer's, else
    its eos). The text is tokenised with a leading space, as GPT-2 BPE sees a word after a colon.

    Args:
        projector: Maps ``(B, N, E)`` tokens to ``(B, P, H)``.
        lm: A causal LM (frozen here, and kept in eval mode).
        tokenizer: Its tokenizer.
        prompt: Text between prefix and report; masked from the loss.
    """

    def __init__(
        self, projector: Projector, lm: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT
    ) -> None:
        super().__init__()
        hidden = lm.get_input_embeddings().embedding_dim  # type: ignore[operator]
        if projector.out_dim != hidden:
            raise ValueError(
                f"the projector writes width {projector.out_dim} but the LM's hidden size is "
                f"{hidden}"
            )
        self.projector, self.lm, self.tokenizer, self.prompt = projector, lm, tokenizer, prompt
        self.lm.requires_grad_(False).eval()
        self.eos_id = int(tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id
        self.prompt_ids = [self.eos_id if bos is None else int(bos), *self._ids(prompt)]
        self._keep_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """Set training mode on the projector; the LM stays in eval mode."""
        super().train(mode)
        self.lm.eval()
        return self

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with a leading space and the eos token appended."""
        return [[*self._ids(" " + t.strip()), self.eos_id] for t in texts]

    def prefix(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The projector's ``(B, P, H)`` prefix of ``(B, N, E)`` tokens, in the LM's dtype."""
        emb = self.lm.get_input_embeddings().weight  # type: ignore[operator]
        param = next(self.projector.parameters())
        out = self.projector(
            tokens.to(param.device, param.dtype),
            None if mask is None else mask.to(param.device),
            None if positions is None else positions.to(param.device, param.dtype),
        )
        return out.to(emb.dtype)

    def build_inputs(self, prefix: torch.Tensor, texts: Sequence[str]) -> dict[str, Any]:
        """Embeddings, attention mask and labels of ``[prefix][bos][prompt][ text][eos]`` rows.

        Args:
            prefix: ``(B, P, H)``.
            texts: ``B`` texts.

        Returns:
            ``{"inputs_embeds": (B, L, H), "attention_mask": (B, L), "labels": (B, L)`` with
            ``-100`` on prefix, prompt and padding, ``"text_start": S}`` (first text position;
            the same for every row, since all rows share the prompt).
        """
        embed = self.lm.get_input_embeddings()  # type: ignore[operator]
        device = prefix.device
        b, p = prefix.shape[:2]
        ids = self.text_ids(texts)
        t = max(len(i) for i in ids)
        text = torch.full((b, t), self.eos_id, dtype=torch.long, device=device)
        valid = torch.zeros(b, t, dtype=torch.bool, device=device)
        for row, i in enumerate(ids):
            text[row, : len(i)] = torch.tensor(i, device=device)
            valid[row, : len(i)] = True
        prompt = torch.tensor(self.prompt_ids, device=device).expand(b, -1)
        start = p + prompt.shape[1]
        embeds = torch.cat([prefix, embed(prompt), embed(text)], dim=1)
        attention = torch.cat(
            [torch.ones(b, start, dtype=torch.long, device=device), valid.long()], dim=1
        )
        labels = torch.full((b, start + t), -100, dtype=torch.long, device=device)
        labels[:, start:] = torch.where(valid, text, torch.full_like(text, -100))
        return {
            "inputs_embeds": embeds,
            "attention_mask": attention,
            "labels": labels,
            "text_start": start,
        }

    def token_logprobs(
        self, prefix: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every text token given prefix, prompt and the previous tokens.

        Returns:
            ``(logp (B, T), valid (B, T) bool)`` over the text tokens (eos included).
        """
        batch = self.build_inputs(prefix, texts)
        start = batch["text_start"]
        t = batch["labels"].shape[1] - start
        kwargs: dict[str, Any] = {"logits_to_keep": t + 1} if self._keep_logits else {}
        out = self.lm(
            inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"], **kwargs
        )
        # Position j predicts token j + 1: the logits at start-1 .. L-2 predict the text.
        logits = out.logits[:, -(t + 1) : -1].float()
        targets = batch["labels"][:, start:]
        valid = targets != -100
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return picked * valid, valid

    def loss(self, prefix: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Mean cross-entropy over the text tokens (prefix and prompt masked)."""
        logp, valid = self.token_logprobs(prefix, texts)
        return -logp.sum() / valid.sum().clamp_min(1)

    def sequence_logprob(self, prefix: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Summed log-probability of each text (eos included) given its prefix: ``(B,)``."""
        logp, _ = self.token_logprobs(prefix, texts)
        return logp.sum(dim=1)

    @torch.inference_mode()
    def generate(self, prefix: torch.Tensor, max_new_tokens: int = 40) -> list[str]:
        """Greedy text after ``[prefix][bos][prompt]``, up to eos or ``max_new_tokens``.

        Args:
            prefix: ``(B, P, H)``.
            max_new_tokens: Longest text in tokens.

        Returns:
            ``B`` texts.
        """
        from transformers import GenerationConfig

        embed = self.lm.get_input_embeddings()  # type: ignore[operator]
        b = prefix.shape[0]
        prompt = torch.tensor(self.prompt_ids, device=prefix.device).expand(b, -1)
        embeds = torch.cat([prefix, embed(prompt)], dim=1)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_id,
            pad_token_id=self.eos_id,
        )
        out = self.lm.generate(  # type: ignore[operator]
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=prefix.device),
            generation_config=config,
        )
        texts = []
        for row in out.tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(
                self.tokenizer.decode(
                    row, skip_special_tokens=True, clean_up_tokenization_spaces=False
                ).strip()
            )
        return texts


# -------------------------------------------------------------------------------- export, load


def save_projector(model: VisionLanguageModel, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``projector.safetensors`` and ``config.json`` (written last; it holds the sha256).

    Args:
        model: The aligned model.
        folder: The projector folder (created if needed).
        info: JSON facts: ``encoder`` and ``lm`` (each with ``fingerprint``), ``meta``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    projector = model.projector
    state = {k: v.detach().cpu().contiguous().clone() for k, v in projector.state_dict().items()}
    with atomic_target(folder / PROJECTOR_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    config = {
        "format": PROJECTOR_FORMAT,
        "format_version": PROJECTOR_FORMAT_VERSION,
        "projector": projector.config.to_dict(),
        "in_dim": projector.in_dim,
        "out_dim": projector.out_dim,
        "prompt": model.prompt,
        "tokens": "deepest feature map (forward_features), flattened in raster order",
        **info,
        "weights": {
            "file": PROJECTOR_WEIGHTS,
            "sha256": file_sha256(folder / PROJECTOR_WEIGHTS),
        },
    }
    write_bytes_atomic(folder / PROJECTOR_CONFIG, json.dumps(config, indent=2).encode() + b"\n")
    return folder


def load_projector(folder: str | Path) -> tuple[Projector, dict[str, Any]]:
    """Read a projector folder without unpickling anything.

    Returns:
        ``(projector in eval mode, its config.json)``.

    Raises:
        CheckpointError: The folder or a file is missing, corrupt, or does not match its config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "projector folder does not exist")
    try:
        config = json.loads((folder / PROJECTOR_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            folder, f"{PROJECTOR_CONFIG} is missing: not a projector folder"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(folder, f"{PROJECTOR_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != PROJECTOR_FORMAT:
        raise CheckpointError(folder, f"{PROJECTOR_CONFIG} is not an omnienc projector config")
    if config.get("format_version") != PROJECTOR_FORMAT_VERSION:
        raise CheckpointError(
            folder, f"unsupported projector format_version {config.get('format_version')!r}"
        )
    try:
        pconfig = ProjectorConfig.from_dict(config["projector"])
        projector = build_projector(pconfig, int(config["in_dim"]), int(config["out_dim"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(folder, f"invalid projector config: {exc}") from exc
    weights = folder / PROJECTOR_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(folder, f"{PROJECTOR_WEIGHTS} is missing")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != config.get("weights", {}).get("sha256"):
        raise CheckpointError(
            folder, f"{PROJECTOR_WEIGHTS} is corrupt: its sha256 differs from {PROJECTOR_CONFIG}"
        )
    try:
        projector.load_state_dict(load_safetensors_bytes(data), strict=True)
    except Exception as exc:  # safetensors' own errors, and load_state_dict's RuntimeError
        raise CheckpointError(
            folder, f"{PROJECTOR_WEIGHTS} does not fit its config: {exc}"
        ) from exc
    return projector.eval(), config


def _lm_info(path: str | Path, lm: nn.Module) -> dict[str, Any]:
    cfg = lm.config
    return {
        "path": str(path),
        "fingerprint": lm_fingerprint(path),
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": int(lm.get_input_embeddings().embedding_dim),  # type: ignore[operator]
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def load_vision_language(
    checkpoint: str | Path, lm: str | Path, projector: str | Path | None = None
) -> tuple[VisionLanguageModel, Encoder, Preprocessing, dict[str, Any]]:
    """Encoder + projector + LM, after checking that they belong together.

    Args:
        checkpoint: The encoder: a checkpoint folder or ``random:ARCH[:SEED]``.
        lm: The LM folder the projector was aligned with.
        projector: The projector folder (default: ``projector`` beside ``checkpoint``).

    Raises:
        CheckpointError: A folder is missing or corrupt, or the encoder or LM is not the one
            the projector was aligned with (the message names both).
    """
    ckpt_text = str(checkpoint)
    encoder, pre, info = load_encoder_spec(checkpoint)
    if projector is None:
        if ckpt_text.startswith(RANDOM_PREFIX):
            raise CheckpointError(Path(ckpt_text), "a random-init encoder needs --projector DIR")
        projector = Path(checkpoint).parent / "projector"
        if not projector.is_dir():
            raise CheckpointError(
                projector,
                f"no projector beside {checkpoint}; pass --projector DIR (the projector/ folder "
                "of an `omnienc align` run)",
            )
    proj, config = load_projector(projector)
    config = {**config, "folder": str(projector)}
    want = config.get("encoder", {})
    if info["fingerprint"] != want.get("fingerprint"):
        raise CheckpointError(
            Path(ckpt_text),
            f"this encoder ({info['fingerprint'][:19]}…) is not the one projector {projector} was "
            f"aligned with ({str(want.get('fingerprint'))[:19]}…, from {want.get('source')})",
        )
    model, tokenizer = load_causal_lm(lm)
    lm_info = _lm_info(lm, model)
    want_lm = config.get("lm", {})
    if lm_info["hidden_size"] != config["out_dim"]:
        raise CheckpointError(
            Path(lm),
            f"hidden size {lm_info['hidden_size']} differs from the projector's output width "
            f"{config['out_dim']} ({projector} was aligned with {want_lm.get('path')})",
        )
    if lm_info["fingerprint"] != want_lm.get("fingerprint"):
        raise CheckpointError(
            Path(lm),
            f"these LM weights are not the ones projector {projector} was aligned with "
            f"({want_lm.get('path')}); pass that LM folder with --lm",
        )
    return VisionLanguageModel(proj, model, tokenizer, config["prompt"]), encoder, pre, config


@dataclass
class Description:
    """What :func:`describe` returns.

    Attributes:
        text: The generated text.
        templated: Whether the projector was trained on templated text.
        projector: The projector folder used.
    """

    text: str
    templated: bool
    projector: str


def describe(
    checkpoint: str | Path,
    volume: str | Path,
    lm: str | Path,
    projector: str | Path | None = None,
    max_new_tokens: int | None = None,
    frame: int | None = None,
) -> Description:
    """Generate text for one volume (greedy).

    The volume gets the encoder's preprocessing and is encoded whole; the projector was trained
    on the item sizes of its data (e.g. 64 mm crops), so describe volumes of that kind.

    Args:
        checkpoint: Encoder checkpoint folder (or ``random:ARCH[:SEED]``).
        volume: A volume file or DICOM series folder.
        lm: The LM folder the projector was aligned with.
        projector: The projector folder (default: ``projector`` beside ``checkpoint``).
        max_new_tokens: Longest text (default: the projector's recorded value, else 40).
        frame: Frame of a 4D file.

    Raises:
        CheckpointError: See :func:`load_vision_language`.
        VolumeReadError: The volume cannot be read.
    """
    model, encoder, pre, config = load_vision_language(checkpoint, lm, projector)
    out = preprocess_volume(read_volume(volume, frame=frame), pre)
    tokens, pos = volume_tokens(encoder, torch.from_numpy(out["image"])[None])
    with torch.inference_mode():
        prefix = model.prefix(tokens, None, pos[None])
        limit = max_new_tokens or int(config.get("max_new_tokens", 40))
        text = model.generate(prefix, limit)[0]
    meta = config.get("meta", {})
    return Description(text, bool(meta.get("templated", False)), config["folder"])


# ---------------------------------------------------------------------------------- alignment


@dataclass
class AlignConfig:
    """Everything an alignment run needs.

    Attributes:
        encoder: Encoder checkpoint folder, or ``random:ARCH[:SEED]`` (the floor).
        lm: Hugging Face causal-LM folder (frozen).
        projector: The projector.
        data: The paired data (``sources``: built-in templated sets and/or CSV files).
        prompt: Text between prefix and report.
        batch_size: Items per step.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay of the projector's matrices.
        warmup_steps: Linear warm-up before the cosine decay (to 5 %) over ``trainer.max_steps``.
        max_new_tokens: Recorded default length of generated text.
        trainer: ``pytorch_lightning.Trainer`` keyword arguments (``max_steps`` is required).
        run_dir: Output folder (``encoder/``, ``projector/``, ``config.yaml``, ``logs/``).
        data_root: Data root (default ``$OMNIENC_DATA`` or ``../shared/data``).
        seed: Seeds the projector's initialisation and the batch order.
    """

    encoder: str = "checkpoints/omnienc-cpu30min"
    lm: str = "runs/language/lm"
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    data: PairedDataConfig = field(default_factory=PairedDataConfig)
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_new_tokens: int = 40
    trainer: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs/align"
    data_root: str | None = None
    seed: int = 0


TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 300,
    "max_epochs": -1,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    "enable_model_summary": False,
}


class AlignModule(pl.LightningModule):
    """Trains the projector of a :class:`VisionLanguageModel` by the LM loss on the text.

    Attributes:
        losses: Training loss of every step.
    """

    def __init__(self, model: VisionLanguageModel, config: AlignConfig, max_steps: int) -> None:
        super().__init__()
        self.model, self.config, self.max_steps = model, config, int(max_steps)
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        prefix = self.model.prefix(batch["tokens"], batch["mask"], batch["positions"])
        loss = self.model.loss(prefix, batch["text"])
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"alignment: non-finite loss {float(loss)} at step {self.global_step}; lower lr"
            )
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def configure_optimizers(self) -> Any:
        groups = decay_groups(self.model.projector, self.config.lr, self.config.weight_decay)
        return adamw_warmup_cosine(groups, self.config.warmup_steps, self.max_steps, 0.05)


def training_tokens(
    config: AlignConfig, encoder: Encoder, preprocessing: Preprocessing, progress: bool = False
) -> TokenSet:
    """Encoder tokens of the ``train`` split of ``config.data``."""
    sets = paired_dataset(config.data, "train", preprocessing, config.data_root, progress)
    return encode_tokens(encoder, ConcatDataset(list(sets.values())), progress=progress)


def align(config: AlignConfig, tokens: TokenSet | None = None, progress: bool = True) -> Path:
    """Train a projector between a frozen encoder and a frozen LM, and export both.

    Args:
        config: The run's :class:`AlignConfig`.
        tokens: Precomputed training tokens of this encoder (else encoded from ``config.data``).
        progress: Show progress bars.

    Returns:
        The projector folder, ``run_dir/projector`` (the encoder is in ``run_dir/encoder``).
    """
    run_dir = Path(config.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {**TRAINER_DEFAULTS, **config.trainer}
    max_steps = int(kwargs.get("max_steps") or -1)
    if max_steps < 1:
        raise ValueError("set trainer.max_steps (>= 1): an alignment run needs an end")
    encoder, pre, enc_info = load_encoder_spec(config.encoder)
    lm, tokenizer = load_causal_lm(config.lm)
    if tokens is None:
        tokens = training_tokens(config, encoder, pre, progress)
    if len(tokens) == 0:
        raise ValueError("alignment has no training items")
    pl.seed_everything(config.seed, workers=True, verbose=False)
    hidden = int(lm.get_input_embeddings().embedding_dim)  # type: ignore[operator]
    projector = build_projector(config.projector, encoder.embed_dim, hidden)
    projector.fit_input_stats(tokens.tokens)
    model = VisionLanguageModel(projector, lm, tokenizer, config.prompt)
    module = AlignModule(model, config, max_steps)
    from pytorch_lightning.loggers import CSVLogger

    if kwargs.get("enable_progress_bar") is None:
        kwargs["enable_progress_bar"] = progress
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="logs"),
        enable_checkpointing=False,
        **kwargs,
    )
    loader = DataLoader(tokens, config.batch_size, shuffle=True, collate_fn=collate_tokens)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen LM
        trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    model.cpu().eval()
    save_encoder(
        encoder, run_dir / "encoder", pre, meta={**enc_info["meta"], "aligned_from": config.encoder}
    )
    sources: dict[str, int] = {}
    for m in tokens.metas:
        sources[str(m.get("source", "?"))] = sources.get(str(m.get("source", "?")), 0) + 1
    templated = bool(tokens.metas) and all(m.get("templated") for m in tokens.metas)
    info = {
        "encoder": {k: v for k, v in enc_info.items() if k != "meta"},
        "lm": _lm_info(config.lm, lm),
        "max_new_tokens": config.max_new_tokens,
        "meta": {
            "templated": templated,
            "items": sources,
            "steps": max_steps,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "seed": config.seed,
            "final_loss": float(np.mean(module.losses[-20:])) if module.losses else None,
            "train_seconds": round(seconds, 1),
        },
    }
    return save_projector(model, run_dir / "projector", info)


def build_parser() -> Any:
    """jsonargparse parser of ``omnienc align`` (config file + dotted overrides)."""
    return trainer_config_parser(
        "omnienc align",
        "Train a projector from a frozen encoder into a frozen causal LM on paired "
        "(volume, text) data, and export it beside the encoder. Values come from --config YAML "
        "files, then dotted overrides such as --trainer.max_steps 100 or "
        "--projector.kind mlp. Unknown keys are errors.",
        AlignConfig,
        TRAINER_DEFAULTS,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``omnienc align``; returns the exit status.

    A bad config exits with status 2; errors of the run itself propagate (the ``omnienc``
    command prints them in one line).
    """
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        namespace = parser.parse_args(argv)
        init = parser.instantiate_classes(namespace)
        fields = {k: v for k, v in vars(init).items() if k in AlignConfig.__dataclass_fields__}
        fields["trainer"] = namespace.trainer.as_dict()
        config = AlignConfig(**fields)
    except (ArgumentError, ValueError, TypeError) as exc:
        print(f"omnienc align: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(config.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    namespace.pop("config", None)
    with atomic_target(run_dir / "config.yaml") as tmp:
        tmp.write_text(parser.dump(namespace, skip_none=False))
    folder = align(config)
    print(f"exported projector: {folder} (encoder: {run_dir / 'encoder'})")
    return 0
