"""Training the language adapter's projector: ``omnienc align --config ...``.

:func:`align` is a Lightning run (:class:`AlignModule`) over cached frozen-encoder tokens that
trains only the projector by the language-modelling loss, then exports the frozen encoder and
the projector side by side (:mod:`omnienc.adapters.language.checkpoint`); :func:`main` parses
the command line (a YAML config merged with overrides) and calls it.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader

from omnienc.adapters.language.checkpoint import _lm_info, save_projector
from omnienc.adapters.language.model import DEFAULT_PROMPT, VisionLanguageModel, load_causal_lm
from omnienc.adapters.language.projector import ProjectorConfig, build_projector
from omnienc.adapters.language.sources import PairedDataConfig, paired_dataset
from omnienc.adapters.language.tokens import (
    TokenSet,
    collate_tokens,
    encode_tokens,
    load_encoder_spec,
)
from omnienc.atomic import atomic_target
from omnienc.checkpoint import save_encoder
from omnienc.config import trainer_config_parser
from omnienc.encoders.base import Encoder
from omnienc.optim import adamw_warmup_cosine, decay_groups
from omnienc.preprocessing import Preprocessing

logger = logging.getLogger("omnienc")


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
    hidden = int(lm.get_input_embeddings().embedding_dim)
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
