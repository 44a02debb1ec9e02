"""``hf-hub:ORG/NAME[@REV]`` checkpoints, from a Hugging Face cache laid out in the test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from omnienc.checkpoint import load_checkpoint_config, load_encoder, load_extra, save_encoder
from omnienc.encoders import build_encoder
from omnienc.errors import CheckpointError
from omnienc.hub import parse_hub_id, resolve_checkpoint
from omnienc.preprocessing import Preprocessing

PRE = Preprocessing(spacing=(1.5, 1.5, 1.5), crop_foreground=False)
MAIN = "a" * 40
V1 = "b" * 40


def _save(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    enc = build_encoder("resconv_tiny")
    head = torch.nn.Linear(4, 2)
    return save_encoder(enc, folder, PRE, meta={"step": seed}, extra={"incontext_head": head})


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding my-lab/enc at main (seed 0) and at tag v1 (seed 1), offline."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--my-lab--enc"
    _save(repo / "snapshots" / MAIN, seed=0)
    _save(repo / "snapshots" / V1, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def _features(spec: str | Path) -> torch.Tensor:
    encoder, _ = load_encoder(spec)
    with torch.inference_mode():
        return encoder(torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_load_by_id_resolves_to_the_main_snapshot(hub_cache: Path) -> None:
    folder = hub_cache / "models--my-lab--enc" / "snapshots" / MAIN
    assert resolve_checkpoint("hf-hub:my-lab/enc") == folder
    assert torch.equal(_features("hf-hub:my-lab/enc"), _features(folder))
    assert load_checkpoint_config("hf-hub:my-lab/enc")["meta"]["step"] == 0
    assert set(load_extra("hf-hub:my-lab/enc", "incontext_head")) == {"weight", "bias"}
    _, pre = load_encoder(Path("hf-hub:my-lab/enc"))  # as the CLI passes it (type=Path)
    assert pre == PRE


@pytest.mark.parametrize("rev", ["v1", V1])
def test_load_at_a_revision(hub_cache: Path, rev: str) -> None:
    snapshot = hub_cache / "models--my-lab--enc" / "snapshots" / V1
    assert resolve_checkpoint(f"hf-hub:my-lab/enc@{rev}") == snapshot
    assert load_checkpoint_config(f"hf-hub:my-lab/enc@{rev}")["meta"]["step"] == 1
    assert not torch.equal(_features(f"hf-hub:my-lab/enc@{rev}"), _features("hf-hub:my-lab/enc"))


def test_hf_home_is_honoured(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    home = tmp_path / "hf-home"
    shutil.copytree(hub_cache, home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert (
        resolve_checkpoint("hf-hub:my-lab/enc") == home / "hub/models--my-lab--enc/snapshots" / MAIN
    )


def test_unknown_id_names_it_and_says_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_encoder("hf-hub:my-lab/nope")
    msg = str(info.value)
    assert msg.startswith("hf-hub:my-lab/nope: my-lab/nope is not in the Hugging Face cache"), msg
    assert "HF_HUB_OFFLINE=1 forbids downloading" in msg and "hf download my-lab/nope" in msg


def test_missing_revision_lists_the_cached_ones(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_encoder("hf-hub:my-lab/enc@v2")
    msg = str(info.value)
    assert msg.startswith("hf-hub:my-lab/enc@v2: revision 'v2' of my-lab/enc is not in"), msg
    assert "cached: main, v1" in msg and "unset HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize(
    "spec", ["hf-hub:", "hf-hub:enc", "hf-hub:my-lab/enc@", "hf-hub:a/b/c", "hf-hub:my lab/enc"]
)
def test_malformed_ids(spec: str) -> None:
    with pytest.raises(
        CheckpointError, match="is not a Hugging Face Hub id; write hf-hub:ORG/NAME"
    ):
        parse_hub_id(spec)


def test_a_repository_without_config_json_is_not_an_encoder(hub_cache: Path) -> None:
    (hub_cache / "models--my-lab--enc" / "snapshots" / MAIN / "config.json").unlink()
    with pytest.raises(CheckpointError) as info:
        load_encoder("hf-hub:my-lab/enc")
    msg = str(info.value)
    assert msg.startswith(
        "hf-hub:my-lab/enc: the Hub repository my-lab/enc@main has no config.json"
    )
    assert "omnienc export" in msg


def test_cli_reports_a_bad_id_in_one_line(hub_cache: Path, capsys) -> None:
    from omnienc.cli import main

    assert main(["embed", "hf-hub:my-lab/nope", "x.nii", "-o", "f.npz"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnienc: error: hf-hub:my-lab/nope: ") and "\n" not in err
