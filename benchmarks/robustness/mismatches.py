"""Valid checkpoints that do not fit (:data:`MISMATCHES`): other architectures, inputs, heads.

Each must be refused with the documented error that names both sides (:func:`run_mismatch`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from omnienc.benchmarks.robustness.attacks import (
    AttackContext,
    AttackResult,
    _cli,
    _python,
    _segment_argv,
    _tiny_pretrain_config,
)
from omnienc.benchmarks.robustness.payloads import _copy_checkpoint, _edit_config, _replace_file


def _fresh_checkpoint(folder: Path, arch: str, **overrides: Any) -> Path:
    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    torch.manual_seed(0)
    return save_encoder(build_encoder(arch, **overrides), folder, Preprocessing())


def _other_arch_weights(ctx: AttackContext, work: Path) -> tuple[bool, str]:
    from omnienc.checkpoint import load_encoder

    small = _fresh_checkpoint(work / "small", "resconv_small")
    tiny = _fresh_checkpoint(work / "tiny", "resconv_tiny")
    _replace_file(tiny, "weights", (small / "model.safetensors").read_bytes())
    return _python(lambda: load_encoder(tiny))


def _other_input_size(ctx: AttackContext, work: Path) -> tuple[bool, str]:
    from omnienc.checkpoint import load_encoder

    vit = _fresh_checkpoint(work / "vit64", "vit3d_tiny", img_size=64)
    config = json.loads((vit / "config.json").read_text())["config"]
    _edit_config(vit, config={**config, "img_size": 32})
    return _python(lambda: load_encoder(vit))


def _head_of_other_encoder(ctx: AttackContext, work: Path) -> tuple[bool, str]:
    from omnienc.encoders import build_encoder
    from omnienc.pretext.incontext import HeadConfig, InContextHead
    from omnienc.pretext.segment import HEAD_NAME

    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    meta = json.loads((folder / "config.json").read_text())["meta"]
    other = InContextHead(
        build_encoder("vit3d_tiny").feature_info, HeadConfig.from_dict(meta[HEAD_NAME])
    )
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    _replace_file(folder, "extra", save(state), extra=HEAD_NAME)
    return _cli(_segment_argv(ctx, str(folder), work))


def _resume_other_encoder(ctx: AttackContext, work: Path) -> tuple[bool, str]:
    refused, message = _cli(["pretrain", "--config", str(_tiny_pretrain_config(ctx, work))])
    if refused or not (work / "run" / "checkpoints" / "last.ckpt").is_file():
        return False, f"the first run failed: {message}"
    cfg = _tiny_pretrain_config(ctx, work, encoder="resconv_small")
    return _cli(["pretrain", "--config", str(cfg), "--trainer.max_steps", "4"])


# (entry point, function(ctx, work) -> (refused, message), regex saying what differs)
MISMATCHES: dict[str, tuple[str, Callable[[AttackContext, Path], tuple[bool, str]], str]] = {
    "resconv_small weights under a resconv_tiny config.json": (
        "load_encoder",
        _other_arch_weights,
        r"does not match the resconv encoder .*widths=\[8, 16, 32, 64\].*unexpected keys "
        r"\['stages\.2\.1\..*checkpoint \(16, 16, 3, 3, 3\) vs model \(8, 8, 3, 3, 3\)",
    ),
    "ViT trained at 64^3, config.json says 32^3": (
        "load_encoder",
        _other_input_size,
        r"img_size=32.*pos_embed: checkpoint \(1, 192, 4, 4, 4\) vs model \(1, 192, 2, 2, 2\)",
    ),
    "in-context head built for another encoder": (
        "omnienc segment",
        _head_of_other_encoder,
        r"incontext_head weights do not match .*checkpoint \(\d+, 192, 1, 1, 1\) vs model",
    ),
    "run resumed with another encoder in the config": (
        "omnienc pretrain (resume)",
        _resume_other_encoder,
        r"last\.ckpt: was written by a different model than this config builds \(.*"
        r"encoder\.\S+: checkpoint \(\d+, .*\) vs model \(\d+, ",
    ),
}


def run_mismatch(name: str, ctx: AttackContext) -> AttackResult:
    """Run one case of :data:`MISMATCHES`; refused means an omnienc error saying what differs."""
    import re

    entry, make, pattern = MISMATCHES[name]
    work = ctx.work / "".join(c if c.isalnum() else "-" for c in name)
    work.mkdir(parents=True, exist_ok=True)
    refused, message = make(ctx, work)
    says = refused and re.search(pattern, message) is not None
    if refused and not says:
        message = f"refused without saying what differs (expected {pattern!r}): {message}"
    return AttackResult(name, entry, bool(says), False, message)
