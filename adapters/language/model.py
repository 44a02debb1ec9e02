"""The frozen causal language model and the vision-language model around it.

Any model that ``transformers.AutoModelForCausalLM`` loads from a local folder works
(:func:`load_causal_lm`); it stays frozen and in eval mode. :class:`VisionLanguageModel` prepends
the projector's prefix ``(P, H)`` to the embedded prompt and text; a sequence is
``[prefix P][bos][prompt][ text][eos]``, and only the projector learns, by the language-modelling
loss on the text tokens (prefix and prompt are masked). LoRA on the LM (peft) is not offered:
peft is not installed here, and the question measured (does image information pass through the
projector?) is asked of a frozen LM.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnienc.adapters.language.projector import Projector
from omnienc.checkpoint import file_sha256
from omnienc.errors import CheckpointError

DEFAULT_PROMPT = "Report:"
LM_WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
