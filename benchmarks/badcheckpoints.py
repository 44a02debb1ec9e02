"""Untrusted checkpoint and cache files: pickle payloads, tampered folders, other architectures.

Each attack writes a file a user could be handed (a ``.pt`` from a forum, a checkpoint folder
from a colleague, a shared cache) into a scratch folder and hands it to one loader: the Python
API (``load_encoder``, ``VolumeFolder``, ...) or the command line (``omnienc embed``, ``probe``,
``segment``, ``pretrain``). A pickle payload is an object whose ``__reduce__`` creates a marker
file when unpickled (:class:`PicklePayload`); an attack is *refused* when the loader raises its
documented omnienc error (or, for a cache entry, rebuilds it with a warning), and the payload
*ran* when the marker exists afterwards. The tests (``tests/robustness/``) and the benchmark
(``python -m omnienc.benchmarks.robustness``) share these attacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnienc.benchmarks.badinputs import GOOD, MR, MR_SEG


class PicklePayload:
    """Unpickling this object creates ``marker``: what a malicious checkpoint could do instead.

    Args:
        marker: The file that unpickling creates.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def write_pickle_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-style ``torch.save`` dict whose ``state_dict`` is a :class:`PicklePayload`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": PicklePayload(marker), "global_step": 1, "epoch": 0}, path)
    return path


def pickle_bytes(marker: Path) -> bytes:
    """The bytes of :func:`write_pickle_checkpoint` (to hide in a file of another name)."""
    buf = io.BytesIO()
    torch.save({"state_dict": PicklePayload(marker)}, buf)
    return buf.getvalue()


def payload_is_live(work: Path) -> bool:
    """Whether unpickling a payload really creates its marker (so a refusal is not vacuous)."""
    marker = work / "live-marker"
    path = write_pickle_checkpoint(work / "live.pt", marker)
    torch.load(path, weights_only=False)  # the unsafe load every loader must avoid
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def poison_npz(path: Path, key: str, marker: Path) -> Path:
    """Replace array ``key`` of a real ``.npz`` by a pickled :class:`PicklePayload`, in place.

    The other arrays stay, so a loader gets past its key checks to the pickled one.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != key}
    arrays[key] = np.array([PicklePayload(marker)], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # object arrays are pickled on save
    path.write_bytes(buf.getvalue())
    return path


def _replace_file(folder: Path, entry: str, data: bytes, extra: str | None = None) -> None:
    """Overwrite a weights file and record its new sha256, as a careful attacker would."""
    config = json.loads((folder / "config.json").read_text())
    record = config["weights"] if extra is None else config["extra"][extra]
    (folder / record["file"]).write_bytes(data)
    record["sha256"] = _sha256(folder / record["file"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))


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
    from omnienc.benchmarks.robustness import run_cli

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
        from omnienc.benchmarks.robustness import _captured
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


def run_checkpoint_attacks(work: Path, checkpoint: Path, volumes: Path) -> list[dict[str, Any]]:
    """Every attack of :data:`ATTACKS` and :data:`MISMATCHES`, as table rows.

    Args:
        work: Scratch folder.
        checkpoint: A genuine exported encoder with an in-context head.
        volumes: ``<data root>/volumes``.

    Returns:
        Rows ``{"attack", "entry", "refused", "executed", "message"}``.

    Raises:
        RuntimeError: The pickle payload does not run when unpickled unsafely (the check
            would prove nothing).
    """
    work.mkdir(parents=True, exist_ok=True)
    if not payload_is_live(work):
        raise RuntimeError(
            "the pickle payload does not create its marker: the attacks prove nothing"
        )
    ctx = AttackContext(work, checkpoint, volumes)
    rows = [vars(run_attack(name, ctx)) for name in ATTACKS]
    rows += [vars(run_mismatch(name, ctx)) for name in MISMATCHES]
    return rows
