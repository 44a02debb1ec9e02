"""Encoder checkpoints: round trips, atomic overwrite, and one test per bad checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import omnienc
from omnienc.checkpoint import load_checkpoint_config, load_encoder, load_extra, save_encoder
from omnienc.encoders import Encoder, build_encoder
from omnienc.errors import CheckpointError
from omnienc.preprocessing import Preprocessing

PRE = Preprocessing(spacing=(1.5, 1.5, 3.0), spatial_size=(32, 32, 32), crop_foreground=False)


def _encoder(name: str = "resconv_tiny", seed: int = 0, **overrides: Any) -> Encoder:
    torch.manual_seed(seed)
    enc = build_encoder(name, **overrides)
    # Move every affine norm off its (1, 0) init so that a round trip has something to keep.
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return enc


def _volume(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_encoder(_encoder(), tmp_path / "ckpt", PRE, meta={"pretext": "test", "step": 7})


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@contextlib.contextmanager
def _raises(path: Path, *fragments: str) -> Iterator[None]:
    """Expect a CheckpointError whose message names ``path`` and contains every fragment."""
    with pytest.raises(CheckpointError) as info:
        yield
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("name", ["resconv_tiny", "vit3d_tiny"])
def test_round_trip(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(name).eval()
    folder = save_encoder(enc, tmp_path / name, PRE, meta={"step": 3})
    assert folder == tmp_path / name
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_encoder must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded, pre = load_encoder(folder)

    assert type(loaded) is type(enc) and loaded.config == enc.config
    assert not loaded.training
    assert pre == PRE
    x = _volume()
    with torch.inference_mode():
        assert torch.equal(loaded(x), enc(x))
        for a, b in zip(loaded.forward_intermediates(x), enc.forward_intermediates(x), strict=True):
            assert torch.equal(a, b)
    config = load_checkpoint_config(folder)
    assert config["arch"] == name and config["family"] == enc.family
    assert config["embed_dim"] == enc.embed_dim and config["meta"] == {"step": 3}
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert config["weights"] == {"file": "model.safetensors", "sha256": digest}


def test_top_level_reexport(saved: Path) -> None:
    enc, pre = omnienc.load_encoder(saved)
    assert isinstance(enc, Encoder) and pre == PRE


def test_overridden_config_saves_family_as_arch(tmp_path: Path) -> None:
    enc = _encoder(in_chans=2)
    folder = save_encoder(enc, tmp_path / "two", PRE)
    assert load_checkpoint_config(folder)["arch"] == "resconv"
    loaded, _ = load_encoder(folder)
    assert loaded.config.in_chans == 2


def test_extra_modules_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    folder = save_encoder(_encoder(), tmp_path / "ckpt", PRE, extra={"incontext_head": head})
    config = load_checkpoint_config(folder)
    assert config["extra"]["incontext_head"]["file"] == "incontext_head.safetensors"
    state = load_extra(folder, "incontext_head")
    assert state.keys() == head.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    fresh = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), head(x))
    with _raises(folder, "no extra module 'decoder'", "incontext_head"):
        load_extra(folder, "decoder")


def test_bad_extra_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra module name"):
        save_encoder(_encoder(), tmp_path / "c", PRE, extra={"../evil": nn.Linear(1, 1)})
    assert not (tmp_path / "c").exists()


def test_overwrite_keeps_only_new(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_encoder(_encoder(seed=0), folder, PRE, extra={"head": nn.Linear(2, 2)})
    new = _encoder(seed=1).eval()
    save_encoder(new, folder, PRE, meta={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = load_encoder(folder)
    x = _volume()
    with torch.inference_mode():
        assert torch.equal(loaded(x), new(x))
    assert load_checkpoint_config(folder)["meta"] == {"step": 2}


def test_refuses_to_overwrite_other_folder(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    with _raises(folder, "not an omnienc encoder checkpoint; refusing to overwrite"):
        save_encoder(_encoder(), folder, PRE)
    assert (folder / "todo.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_failed_save_leaves_old_checkpoint(
    tmp_path: Path, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (saved / "model.safetensors").read_bytes()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("omnienc.checkpoint.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_encoder(_encoder(seed=5), saved, PRE)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (saved / "model.safetensors").read_bytes() == before


def test_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with _raises(path, "checkpoint folder does not exist"):
        load_encoder(path)


def test_missing_config(saved: Path) -> None:
    (saved / "config.json").unlink()
    with _raises(saved, "config.json is missing"):
        load_encoder(saved)


def test_bad_json(saved: Path) -> None:
    (saved / "config.json").write_text('{"format": "omnienc-encoder",')
    with _raises(saved, "config.json is not valid JSON"):
        load_encoder(saved)


def test_wrong_format(saved: Path) -> None:
    _edit_config(saved, format="lightning")
    with _raises(saved, "format 'lightning'", "expected 'omnienc-encoder'"):
        load_encoder(saved)


def test_unsupported_version(saved: Path) -> None:
    _edit_config(saved, format_version=2)
    with _raises(saved, "unsupported format_version 2"):
        load_encoder(saved)


def test_unknown_family(saved: Path) -> None:
    _edit_config(saved, family="swin3d")
    with _raises(saved, "unknown encoder family 'swin3d'", "resconv"):
        load_encoder(saved)


def test_unknown_arch(saved: Path) -> None:
    _edit_config(saved, arch="resconv_huge")
    with _raises(saved, "unknown arch 'resconv_huge'"):
        load_encoder(saved)


def test_bad_encoder_config(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["config"]["widht"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with _raises(saved, "invalid resconv encoder config", "widht"):
        load_encoder(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with _raises(saved, "weights file model.safetensors is missing"):
        load_encoder(saved)


def test_tampered_weights(saved: Path) -> None:
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with _raises(saved, "model.safetensors is corrupt", "sha256"):
        load_encoder(saved)


def test_truncated_weights(saved: Path) -> None:
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with _raises(saved, "model.safetensors is corrupt"):
        load_encoder(saved)
    # Even with a matching sha256 a truncated file is refused as unreadable.
    weights = {"file": "model.safetensors", "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    _edit_config(saved, weights=weights)
    with _raises(saved, "model.safetensors is not a readable safetensors file"):
        load_encoder(saved)


def test_arch_mismatch_lists_shapes(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["config"]["widths"] = [8, 16, 32, 128]
    config["embed_dim"] = 128
    (saved / "config.json").write_text(json.dumps(config))
    with _raises(
        saved,
        "does not match the resconv encoder",
        "stages.3.0.conv1.weight: checkpoint (64, 32, 3, 3, 3) vs model (128, 32, 3, 3, 3)",
        "stages.3.0.norm2.weight: checkpoint (64,) vs model (128,)",
    ):
        load_encoder(saved)


def test_missing_keys(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["config"]["depths"] = [1, 1, 1, 2]
    (saved / "config.json").write_text(json.dumps(config))
    with _raises(saved, "missing keys ['stages.3.1.conv1.weight', "):
        load_encoder(saved)


def test_unexpected_keys(tmp_path: Path) -> None:
    folder = save_encoder(_encoder(depths=(1, 1, 2, 1)), tmp_path / "deep", PRE)
    config = json.loads((folder / "config.json").read_text())
    config["config"]["depths"] = [1, 1, 1, 1]
    (folder / "config.json").write_text(json.dumps(config))
    with _raises(folder, "unexpected keys ['stages.2.1.conv1.weight', "):
        load_encoder(folder)


def test_embed_dim_mismatch(saved: Path) -> None:
    _edit_config(saved, embed_dim=65)
    with _raises(saved, "embed_dim 65 in config.json does not match"):
        load_encoder(saved)


class _Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth"])
def test_pickle_file_refused_without_unpickling(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / f"encoder{suffix}"
    torch.save({"state_dict": _Payload(marker)}, bad)
    assert not marker.exists()
    with _raises(bad, "not an omnienc encoder folder", "only a folder of safetensors + JSON"):
        load_encoder(bad)
    assert not marker.exists()
    # The payload is real: unpickling it would have created the marker.
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_plain_file_refused(saved: Path) -> None:
    file = saved / "model.safetensors"
    with _raises(file, "is a file, not an omnienc encoder folder"):
        load_encoder(file)


def test_weights_files_follow_the_umask(tmp_path: Path):
    import os
    import stat

    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    old = os.umask(0o022)
    try:
        ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    finally:
        os.umask(old)
    mode = stat.S_IMODE((ckpt / "model.safetensors").stat().st_mode)
    assert mode == 0o644


def test_a_save_killed_between_its_renames_is_recovered(tmp_path: Path):
    import os
    import shutil

    from omnienc.atomic import pid_alive

    dead = 4_000_000
    while pid_alive(dead):
        dead -= 1
    folder = save_encoder(_encoder(), tmp_path / "ckpt", PRE)
    aside = tmp_path / f".ckpt.old-{dead}-0123abcd"
    os.replace(folder, aside)  # the old checkpoint moved aside, the new one never renamed in
    half = tmp_path / f".ckpt.tmp-{dead}-89abcdef"
    half.mkdir()
    with _raises(folder, "interrupted save", aside.name):
        load_encoder(folder)
    save_encoder(_encoder(), folder, PRE)  # the next save repairs, then replaces
    assert load_encoder(folder)
    assert not aside.exists() and not half.exists()
    shutil.rmtree(folder)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_another_hosts_recent_aside_is_neither_restored_nor_deleted(tmp_path: Path, monkeypatch):
    import os

    from omnienc.atomic import pid_alive

    monkeypatch.setenv("OMNIENC_HOSTNAME", "alpha")
    dead = 4_000_000
    while pid_alive(dead):
        dead -= 1
    folder = save_encoder(_encoder(), tmp_path / "ckpt", PRE)
    aside = tmp_path / f".ckpt.old-beta-{dead}-0123abcd"  # beta is mid-swap, as far as we know
    os.replace(folder, aside)
    with _raises(folder, "interrupted save", aside.name):
        load_encoder(folder)
    save_encoder(_encoder(seed=2), folder, PRE)
    assert aside.is_dir() and load_encoder(aside)
    monkeypatch.setenv("OMNIENC_HOSTNAME", "beta")  # beta itself knows its writer is gone
    save_encoder(_encoder(seed=3), folder, PRE)
    assert not aside.exists()


def test_a_save_that_races_another_one_retries_and_wins(tmp_path: Path, monkeypatch) -> None:
    import os

    folder = tmp_path / "ckpt"
    real_replace = os.replace
    raced = []

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == folder and Path(src).name.startswith(".ckpt.tmp-") and not raced:
            # Another writer renames its complete checkpoint in first (between our two renames).
            raced.append(save_encoder(_encoder(seed=8), tmp_path / "other", PRE))
            real_replace(tmp_path / "other", folder)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    mine = _encoder(seed=9).eval()
    save_encoder(mine, folder, PRE)
    monkeypatch.undo()
    assert raced and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_encoder(folder)
    x = _volume()
    with torch.inference_mode():
        assert torch.equal(loaded(x), mine(x))  # the last writer wins; nothing is left aside
