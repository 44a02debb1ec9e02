"""``omnienc export``: a publishable folder (weights, config.json, model card) that loads alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omnienc.checkpoint import file_sha256, load_encoder, save_encoder
from omnienc.cli import main
from omnienc.encoders import build_encoder
from omnienc.errors import CheckpointError, DataError
from omnienc.export import export_checkpoint
from omnienc.preprocessing import Preprocessing

SHIPPED = Path("checkpoints/omnienc-cpu30min")
SHIPPED_RESULTS = Path("benchmarks/results/bench/all.json")
RUN_CONFIG = """\
model:
  encoder: resconv_tiny
data:
  roots: [volumes, /scratch/ct-corpus]
  medmnist: []
  pair:
    crop_size: [32, 32, 32]
data_root: /data/shared
seed: 3
"""


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _features(folder: Path) -> torch.Tensor:
    encoder, _ = load_encoder(folder)
    with torch.inference_mode():
        return encoder(torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder: encoder/ (with an in-context head) and the resolved config.yaml."""
    torch.manual_seed(0)
    save_encoder(
        build_encoder("resconv_tiny"),
        tmp_path / "run" / "encoder",
        Preprocessing(spacing=(1.5, 1.5, 1.5)),
        meta={"pretext": "incontext+ntxent", "step": 40, "crop_size": [32, 32, 32]},
        extra={"incontext_head": torch.nn.Linear(3, 2)},
    )
    (tmp_path / "run" / "config.yaml").write_text(RUN_CONFIG)
    return tmp_path / "run"


def _results(tmp_path: Path, checkpoint: Path, digest: str | None = None) -> Path:
    """A results file in the layout `omnienc bench classification` writes."""
    digest = digest or file_sha256(checkpoint / "model.safetensors")
    row = {
        "encoder": "pretrained",
        "method": "linear",
        "fraction": 1.0,
        "n_train": 100,
        "metrics": {"auc": 0.8125, "acc": 0.75},
        "intervals": {"auc": [0.7, 0.9], "acc": [0.6, 0.8]},
    }
    doc = {
        "command": "omnienc bench classification --encoder run/encoder",
        "results": [
            {
                "dataset": "adrenalmnist3d",
                "size": 28,
                "task": "binary-class",
                "encoder": {"checkpoint": f"sha256:{digest}"},
                "rows": [row],
            }
        ],
    }
    path = tmp_path / "classification_adrenalmnist3d_28.json"
    path.write_text(json.dumps(doc))
    return path


def test_export_round_trip_and_model_card(run: Path, tmp_path: Path) -> None:
    results = _results(tmp_path, run / "encoder")
    out = export_checkpoint(
        run / "encoder",
        tmp_path / "pub",
        license="apache-2.0",
        results=[results],
        repo_id="lab/enc",
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "incontext_head.safetensors", "model.safetensors"]
    for name in names[1:]:
        assert (out / name).read_bytes() == (run / "encoder" / name).read_bytes()
    assert torch.equal(_features(out), _features(run / "encoder"))
    card = (out / "README.md").read_text()
    assert _front_matter(card) == {
        "library_name": "omnienc",
        "license": "apache-2.0",
        "tags": ["medical-imaging", "3d", "self-supervised"],
        "pipeline_tag": "feature-extraction",
    }
    for fragment in (
        "# lab/enc",
        "pretext method: `incontext+ntxent`",
        "encoder: `resconv_tiny`",
        "training steps: 40",
        "crop: 32x32x32 voxels",
        "spacing=[1.5, 1.5, 1.5]",
        "`volumes`, `/scratch/ct-corpus`",
        "data root: `/data/shared`",
        "omnienc bench classification --encoder run/encoder",
        "| pretrained | linear | 100% (n=100) | 0.812 [0.70, 0.90] | 0.750 [0.60, 0.80] |",
        'omnienc.load_encoder("hf-hub:lab/enc")',
    ):
        assert fragment in card, fragment
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_without_run_config_or_results_says_not_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "ckpt", Preprocessing())
    assert main(["export", str(ckpt), str(tmp_path / "pub")]) == 0
    card = (tmp_path / "pub" / "README.md").read_text()
    assert _front_matter(card)["license"] == "other"
    assert "Not recorded (no resolved `config.yaml` beside the checkpoint)" in card
    assert "pretext method: `not recorded`" in card and "None recorded" in card


def test_shipped_checkpoint_with_its_committed_results(tmp_path: Path, capsys) -> None:
    argv = ["export", str(SHIPPED), str(tmp_path / "pub"), "--results", str(SHIPPED_RESULTS)]
    assert main([*argv, "--license", "mit"]) == 0
    assert "wrote" in capsys.readouterr().out
    card = (tmp_path / "pub" / "README.md").read_text()
    command = json.loads(SHIPPED_RESULTS.read_text())["command"]
    assert f"```\n{command}\n```" in card
    assert "adrenalmnist3d 28 (binary-class)" in card and "segmentation" in card
    assert torch.equal(_features(tmp_path / "pub"), _features(SHIPPED))


def test_export_of_a_hub_id(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    commit = "c" * 40
    repo = tmp_path / "hf" / "models--lab--enc"
    shutil.copytree(run / "encoder", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_checkpoint("hf-hub:lab/enc", tmp_path / "pub")
    assert torch.equal(_features(out), _features(run / "encoder"))


def test_results_of_other_weights_are_refused(run: Path, tmp_path: Path) -> None:
    results = _results(tmp_path, run / "encoder", digest="0" * 64)
    with pytest.raises(CheckpointError) as info:
        export_checkpoint(run / "encoder", tmp_path / "pub", results=[results])
    assert str(info.value).startswith(f"{results}: was measured with encoder weights sha256:0000")
    assert not (tmp_path / "pub").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not a JSON results file"),
        ('{"results": []}', "records no command"),
        ('{"command": "omnienc bench all"}', "holds no results omnienc export can read"),
        ('{"command": "x", "results": [{"rows": []}]}', "unexpected results layout"),
    ],
)
def test_bad_results_files(run: Path, tmp_path: Path, text: str, problem: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(DataError) as info:
        export_checkpoint(run / "encoder", tmp_path / "pub", results=[bad])
    assert str(info.value).startswith(f"{bad}: {problem}"), str(info.value)


def test_missing_results_file(run: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "none.json"
    assert (
        main(["export", str(run / "encoder"), str(tmp_path / "pub"), "--results", str(missing)])
        == 1
    )
    assert f"{missing}: no such results file" in capsys.readouterr().err


def test_refuses_to_overwrite_another_folder(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_checkpoint(run / "encoder", other)
    assert (other / "todo.txt").read_text() == "keep"


def test_reexport_replaces_the_previous_export(run: Path, tmp_path: Path) -> None:
    export_checkpoint(run / "encoder", tmp_path / "pub", license="mit")
    export_checkpoint(run / "encoder", tmp_path / "pub", license="apache-2.0")
    assert "license: apache-2.0" in (tmp_path / "pub" / "README.md").read_text()


def test_bad_run_config_is_named(run: Path, tmp_path: Path) -> None:
    (run / "config.yaml").write_text("data: [unclosed")
    with pytest.raises(DataError, match="cannot read the run config"):
        export_checkpoint(run / "encoder", tmp_path / "pub")
