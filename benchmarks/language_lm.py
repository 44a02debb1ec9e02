"""The language benchmark's frozen LM: a small GPT-2-config decoder trained on the texts alone.

:func:`train_text_lm` (2 layers, width 128, byte-level BPE trained on the same corpus) learns
the training texts with no image, and is cached by a digest of its config and corpus; the
alignment runs then keep it frozen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from omnienc.adapters.language import DEFAULT_PROMPT
from omnienc.atomic import fsync_dir, temp_sibling
from omnienc.errors import CheckpointError
from omnienc.optim import adamw_warmup_cosine, decay_groups

# ---------------------------------------------------------------------- a small text-only LM


@dataclass(frozen=True)
class TextLMConfig:
    """A small GPT-2-config decoder and its byte-level BPE tokenizer, trained on a text corpus.

    Attributes:
        vocab_size: Largest BPE vocabulary (training stops earlier when no merge is left).
        n_layer: Transformer blocks.
        n_embd: Hidden size ``H``.
        n_head: Attention heads.
        n_positions: Context length; training windows are this long.
        steps: Optimizer steps.
        batch_size: Windows per step.
        lr: Peak AdamW learning rate (warm-up, cosine decay to 5 %).
        warmup_steps: Linear warm-up steps.
        seed: Seeds weights, shuffling and windows.
    """

    vocab_size: int = 1024
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0


def train_text_lm(
    texts: Sequence[str],
    folder: str | Path,
    config: TextLMConfig | None = None,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a small GPT-2 decoder on texts and save it as a Hugging Face folder.

    The tokenizer is a byte-level BPE (GPT-2's kind) trained on the same texts, so its
    vocabulary is a few hundred tokens and the output layer is cheap on a CPU (GPT-2's own
    50,257-token vocabulary would make every LM step about 20 times slower here). Documents are
    ``[eos][prompt][ text][eos]``, as :class:`~omnienc.adapters.language.VisionLanguageModel`
    lays them out after its prefix, concatenated in shuffled order and cut into
    ``n_positions``-token windows at random offsets, so every position of the context is trained.

    Args:
        texts: The corpus (repeats keep their frequency).
        folder: Output folder; replaced if it holds an earlier ``train_text_lm`` result.
        config: Model and training settings.
        prompt: The prompt the aligned model will use.
        progress: Show a progress bar.

    Returns:
        What is recorded in ``folder/omnienc_lm.json``: corpus size, settings, final loss, time.

    Raises:
        CheckpointError: ``folder`` exists and is not an earlier ``train_text_lm`` folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    config = config or TextLMConfig()
    folder = Path(folder)
    if folder.exists() and not (folder / "omnienc_lm.json").is_file():
        raise CheckpointError(folder, "exists and is not a train_text_lm folder; not replacing it")
    if not texts:
        raise ValueError("train_text_lm needs a non-empty corpus")
    start = time.perf_counter()
    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [f"{prompt} {t}" for t in texts],
        trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            special_tokens=[eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos)
    eos_id = int(tokenizer.eos_token_id)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_ids = [eos_id, *ids(prompt)]
    docs = [[*prompt_ids, *ids(" " + t.strip()), eos_id] for t in texts]
    rng = np.random.default_rng(config.seed)
    window = config.n_positions
    n_tokens = sum(len(d) for d in docs)
    passes = max(1, math.ceil(2 * window / n_tokens))
    stream = torch.tensor(
        [t for _ in range(passes) for i in rng.permutation(len(docs)) for t in docs[i]]
    )
    if len(stream) <= window:
        stream = stream.repeat(math.ceil((window + 1) / len(stream)))

    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    opt = adamw_warmup_cosine(
        decay_groups(model, config.lr, 0.01), config.warmup_steps, config.steps, 0.05
    )
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(config.steps), desc="text LM", disable=not progress, unit="step"):
        offsets = torch.randint(0, len(stream) - window, (config.batch_size,), generator=gen)
        batch = torch.stack([stream[o : o + window] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"text LM: non-finite loss at step {len(losses)}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    record = {
        "what": "small GPT-2-config decoder trained by omnienc.benchmarks.language.train_text_lm",
        "texts": len(texts),
        "unique_texts": len(set(texts)),
        "corpus_tokens": n_tokens,
        "vocab_size": len(tokenizer),
        "prompt": prompt,
        "config": asdict(config),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(time.perf_counter() - start, 1),
    }
    tmp = temp_sibling(folder)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "omnienc_lm.json").write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record
