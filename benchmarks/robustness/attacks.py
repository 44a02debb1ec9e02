"""The checkpoint and cache attacks (:data:`ATTACKS`): one untrusted file to one loader each.

An attack is *refused* when the loader raises its documented omnienc error (or, for a cache
entry, rebuilds it with a warning), and the payload *ran* when its marker exists afterwards
(:func:`run_attack`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.benchmarks.robustness.cases import GOOD, MR, MR_SEG
from omnienc.benchmarks.robustness.payloads import (
    _copy_checkpoint,
    _edit_config,
    _replace_file,
    _sha256,
    pickle_bytes,
    poison_npz,
    write_pickle_checkpoint,
)


@dataclass
class AttackContext:
    """What the attacks need.

    Attributes:
        work: Scratch folder (one subfolder per attack).
        checkpoint: A genuine exported encoder with an in-context head, to tamper with.
        volumes: ``<data root>/volumes`` (inputs for embed/segment, data for pretrain).
    """

    work: Path
    checkpoint: Path
    volumes: Path


@dataclass
class AttackResult:
    """One attack: refused, and did its payload run?"""

    attack: str
    entry: str
    refused: bool
    executed: bool
    message: str


def _cli(argv: list[str]) -> tuple[bool, str]:
    """``omnienc ARGV`` in process: (refused cleanly, the error line or what went wrong)."""
    from omnienc.benchmarks.robustness.observation import run_cli

    obs = run_cli(argv)
    lines = [ln for ln in obs.message.splitlines() if ": error: " in ln]
    refused = obs.outcome == "error" and len(lines) == 1
    return refused, lines[0] if refused else f"{obs.outcome}: {obs.message[-600:]}"


def _python(fn: Callable[[], Any]) -> tuple[bool, str]:
    """Call ``fn``: refused when it raises an omnienc error (any other exception is not)."""
    from omnienc.errors import OmniencError

    try:
        fn()
    except OmniencError as exc:
        return True, str(exc)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return False, "accepted"


def _pickle_file(
    suffix: str, entry: str
) -> Callable[[AttackContext, Path, Path], tuple[bool, str]]:
    """A pickle payload saved as ``evil{suffix}`` and handed to ``entry``."""

    def attack(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
        evil = str(write_pickle_checkpoint(work / f"evil{suffix}", marker))
        vol = str(ctx.volumes / GOOD)
        if entry == "load_encoder":
            from omnienc.checkpoint import load_encoder

            return _python(lambda: load_encoder(evil))
        if entry == "omnienc embed":
            return _cli(["embed", evil, vol, "-o", str(work / "f.npz"), "-q"])
        if entry == "omnienc probe":
            return _cli(["probe", evil, "-q"])
        if entry == "omnienc segment":
            return _cli(_segment_argv(ctx, evil, work))
        raise ValueError(entry)

    return attack


def _segment_argv(ctx: AttackContext, checkpoint: str, work: Path) -> list[str]:
    image, mask = str(ctx.volumes / MR), str(ctx.volumes / MR_SEG)
    out = str(work / "m.nii.gz")
    return ["segment", checkpoint, "--support", image, mask, "--query", image, "-o", out]


def _pickle_in_weights(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    _replace_file(folder, "weights", pickle_bytes(marker))
    vol = str(ctx.volumes / GOOD)
    return _cli(["embed", str(folder), vol, "-o", str(work / "f.npz"), "-q"])


def _pickle_in_head(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    _replace_file(folder, "extra", pickle_bytes(marker), extra="incontext_head")
    return _cli(_segment_argv(ctx, str(folder), work))


def _weights_point_to_pickle(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    from omnienc.checkpoint import load_encoder

    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    evil = write_pickle_checkpoint(folder / "evil.pt", marker)
    _edit_config(folder, weights={"file": "evil.pt", "sha256": _sha256(evil)})
    return _python(lambda: load_encoder(folder))


def _weights_outside_folder(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    from omnienc.checkpoint import load_encoder

    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    outside = work / "outside.safetensors"
    shutil.copyfile(folder / "model.safetensors", outside)
    _edit_config(folder, weights={"file": "../outside.safetensors", "sha256": _sha256(outside)})
    return _python(lambda: load_encoder(folder))


def _huge_safetensors_header(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    from omnienc.checkpoint import load_encoder

    folder = _copy_checkpoint(ctx.checkpoint, work / "ckpt")
    # A header length of 2^40 bytes followed by nothing: a reader that trusts it allocates 1 TB.
    _replace_file(folder, "weights", (2**40).to_bytes(8, "little") + b"{}")
    return _python(lambda: load_encoder(folder))


def _tiny_pretrain_config(ctx: AttackContext, work: Path, encoder: str = "resconv_tiny") -> Path:
    import yaml

    data = work / "data"
    if not data.exists():
        data.mkdir(parents=True)
        shutil.copyfile(ctx.volumes / GOOD, data / Path(GOOD).name)
    cfg = {
        "model": {"encoder": encoder, "warmup_steps": 0, "head": {"dim": 16}},
        "data": {
            "roots": [str(data)],
            "batch_size": 2,
            "steps_per_epoch": 1,
            "min_size": 8,
            "pair": {"crop_size": [32, 32, 32], "max_tasks": 2},
            "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "cache_dir": str(work / "cache"),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "run_dir": str(work / "run"),
        "seed": 0,
    }
    path = work / f"config-{encoder}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pickle_resume_checkpoint(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    cfg = _tiny_pretrain_config(ctx, work)
    write_pickle_checkpoint(work / "run" / "checkpoints" / "last.ckpt", marker)
    return _cli(["pretrain", "--config", str(cfg)])


def _poisoned_cache(kind: str) -> Callable[[AttackContext, Path, Path], tuple[bool, str]]:
    """A pickled object array in a preprocessing (``volume``) or mask (``masks``) cache entry.

    Refused means: the entry is rebuilt with a warning naming it, and the run goes on.
    """

    def attack(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
        from omnienc.benchmarks.robustness.observation import _captured
        from omnienc.data.folder import VolumeFolder
        from omnienc.pretext.masks import MaskConfig, compute_folder_masks

        root, cache = work / "data", work / "cache"
        root.mkdir(parents=True)
        shutil.copyfile(ctx.volumes / GOOD, root / Path(GOOD).name)
        folder = VolumeFolder(root, cache_dir=cache, progress=False)
        config = MaskConfig()
        if kind == "volume":
            target = poison_npz(Path(folder.entries[0].cache_file), "image", marker)
        else:
            result = compute_folder_masks(folder, config, cache, progress=False)[0]
            target = poison_npz(Path(result.cache_file), "packed", marker)
        with _captured() as (_, _, handler):
            try:
                again = VolumeFolder(root, cache_dir=cache, progress=False)
                compute_folder_masks(again, config, cache, progress=False)
            except Exception as exc:
                return False, f"{type(exc).__name__}: {exc}"
        hits = [m for m in handler.messages if str(target) in m]
        return bool(hits), hits[0] if hits else f"no warning named {target}: {handler.messages}"

    return attack


def _pickled_feature_file(ctx: AttackContext, work: Path, marker: Path) -> tuple[bool, str]:
    from omnienc.adapters.classification import FeatureSet

    real = FeatureSet(np.zeros((2, 4), np.float32), None, ["a", "b"], "random:x:0", "test")
    path = poison_npz(real.save(work / "features.npz"), "features", marker)
    return _python(lambda: FeatureSet.load(path))


# (attack, entry point it is handed to, function(ctx, work, marker) -> (refused, message))
ATTACKS: dict[str, tuple[str, Callable[[AttackContext, Path, Path], tuple[bool, str]]]] = {
    "pickle payload as .pt": ("load_encoder", _pickle_file(".pt", "load_encoder")),
    "pickle payload as .ckpt": ("omnienc embed", _pickle_file(".ckpt", "omnienc embed")),
    "pickle payload as .pth": ("omnienc probe", _pickle_file(".pth", "omnienc probe")),
    "pickle payload as .bin": ("omnienc segment", _pickle_file(".bin", "omnienc segment")),
    "pickle bytes as model.safetensors (sha256 updated)": ("omnienc embed", _pickle_in_weights),
    "pickle bytes as incontext_head.safetensors": ("omnienc segment", _pickle_in_head),
    "config.json weights file -> evil.pt": ("load_encoder", _weights_point_to_pickle),
    "config.json weights file -> ../outside": ("load_encoder", _weights_outside_folder),
    "safetensors header claiming 2^40 bytes": ("load_encoder", _huge_safetensors_header),
    "pickle payload as last.ckpt of a run": (
        "omnienc pretrain (resume)",
        _pickle_resume_checkpoint,
    ),
    "pickled object in a preprocessing cache entry": ("VolumeFolder", _poisoned_cache("volume")),
    "pickled object in a mask cache entry": ("compute_folder_masks", _poisoned_cache("masks")),
    "pickled object in a feature file": ("FeatureSet.load", _pickled_feature_file),
}


def run_attack(name: str, ctx: AttackContext) -> AttackResult:
    """Run one attack of :data:`ATTACKS` in ``ctx.work / NAME``."""
    entry, attack = ATTACKS[name]
    work = ctx.work / "".join(c if c.isalnum() else "-" for c in name)
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "PAYLOAD-RAN"
    refused, message = attack(ctx, work, marker)
    return AttackResult(name, entry, refused, marker.exists(), message)
