"""``omnienc bench``: the classification benchmark's payload, tables and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnienc.adapters.classification import FinetuneConfig
from omnienc.benchmarks.classification import EndToEndBudget, resolve_encoder, run_classification
from omnienc.benchmarks.classification_report import format_markdown
from omnienc.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "omnienc-cpu30min"


def test_payload_has_every_row_and_the_hashes(data_root: Path):
    payload = run_classification(
        "breastmnist",
        28,
        "random:resconv_tiny",
        medmnist_root=data_root / "medmnist",
        fractions=(0.1, 1.0),
        methods=("linear", "knn", "scratch"),
        finetune=FinetuneConfig(batch_size=16, eval_every=5),
        budget=EndToEndBudget(epochs=0.5, min_steps=2, max_steps=10),
        progress=False,
        log=lambda line: None,
    )
    assert payload["encoder"]["checkpoint"] == "random:resconv_tiny:0"
    assert payload["n"] == {"train": 546, "val": 78, "test": 156}
    assert payload["train_label_counts"]["0.1"] == {"0": 15, "1": 40}
    assert len(payload["data_files"]["breastmnist.npz"]) == 64
    keys = [(r["encoder"], r["method"], r["fraction"]) for r in payload["rows"]]
    assert keys == [
        ("random-init", "linear", 0.1),
        ("random-init", "knn", 0.1),
        ("random-init", "scratch", 0.1),
        ("random-init", "linear", 1.0),
        ("random-init", "knn", 1.0),
        ("random-init", "scratch", 1.0),
    ]
    assert [r["n_train"] for r in payload["rows"]] == [55, 55, 55, 546, 546, 546]
    # half an epoch of batch 16: 55 items -> 2 steps; 546 -> 18, clamped to 10
    assert [r.get("steps") for r in payload["rows"]] == [None, None, 2, None, None, 10]
    for r in payload["rows"]:
        assert 0.0 <= r["metrics"]["auc"] <= 1.0
        lo, hi = r["intervals"]["auc"]
        assert lo <= hi
    text = format_markdown([payload], "omnienc bench classification --dataset breastmnist")
    assert "| random-init | linear probe (frozen) |" in text
    assert "AUC, 10% (n=55)" in text and "AUC, 100% (n=546)" in text
    assert "ResNet-18 (28) | 0.901 | 0.863" in text  # the published anchors beside ours
    assert "at most 10 steps (10%: 2, 100%: 10) of batch 16" in text


def test_end_to_end_budget_scales_with_the_labelled_subset():
    budget = EndToEndBudget()  # 20 epochs, 200..1000 steps
    assert budget.steps_for(12, 32) == 200  # 1% of AdrenalMNIST3D: 8 steps would be 20 epochs
    assert budget.steps_for(1188, 32) == 743
    assert budget.steps_for(100_000, 32) == 1000
    assert EndToEndBudget(steps=50).steps_for(100_000, 32) == 50
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        EndToEndBudget(min_steps=10, max_steps=5)


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="shipped checkpoint not in this checkout")
def test_checkpoint_encoder_carries_its_weights_hash():
    sut = resolve_encoder(SHIPPED)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert sut.checkpoint == "sha256:" + config["weights"]["sha256"]
    assert sut.arch == "resconv_small" and not sut.is_random


def test_cli_writes_json_and_markdown(tmp_path: Path, data_root: Path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "classification",
            "--dataset",
            "breastmnist",
            "--encoder",
            "random:resconv_tiny",
            "--methods",
            "linear",
            "--fractions",
            "1",
            "--no-cache",
            "--out",
            str(out),
            "-q",
            "--data",
            str(data_root),
        ]
    )
    assert code == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["command"].startswith("omnienc bench classification --dataset breastmnist")
    assert doc["results"][0]["machine"]["torch_threads"] >= 1
    assert "linear probe (frozen)" in out.with_suffix(".md").read_text()


def test_bad_method_and_encoder_are_clear_errors(data_root: Path, tmp_path: Path, capsys):
    with pytest.raises(ValueError, match="unknown methods"):
        run_classification(
            "breastmnist", 28, "random:resconv_tiny", medmnist_root=data_root, methods=("svm",)
        )
    code = main(
        ["bench", "classification", "--encoder", str(tmp_path / "nope"), "--data", str(data_root)]
    )
    assert code == 1
    assert "nope" in capsys.readouterr().err


def test_segmentation_table_lists_every_encoder_and_mode():
    from omnienc.benchmarks.segmentation import format_segmentation_markdown

    def payload(encoder: str, liver: float) -> dict:
        summary = {
            k: {"mean": v, "sd": 0.01, "n": 2}
            for k, v in {"spleen": 0.1, "liver": liver, "stomach": 0.0, "mean": liver / 3}.items()
        }
        return {
            "encoder": encoder,
            "split": "train A, test B",
            "structures": {"1": "spleen", "5": "liver", "6": "stomach"},
            "steps": 300,
            "batch_size": 4,
            "crop_size": [32, 32, 32],
            "width": 32,
            "lr": 0.001,
            "seeds": [0, 1],
            "summary": {"frozen": summary, "fine-tune": summary},
        }

    suite = {
        "encoder": "ckpt",
        "floor": "random:resconv_small",
        "benchmarks": [payload("ckpt", 0.54), payload("random:resconv_small", 0.0)],
        "seconds": 120.0,
    }
    text = format_segmentation_markdown(suite)
    assert "| **pretrained** (`ckpt`) | frozen | 0.100 ± 0.010 | 0.540 ± 0.010 |" in text
    assert "| **pretrained** (`ckpt`) | fine-tuned |" in text
    assert "| random-init (`random:resconv_small`) | trained from scratch |" in text
    assert "train A, test B" in text


def test_medsegbench_job_scores_the_encoder_and_its_floor(medsegbench_root: Path, tmp_path: Path):
    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    out = tmp_path / "results" / "msb"
    argv = ["bench", "medsegbench", "--encoder", str(ckpt), "--dataset", "busi"]
    argv += ["--root", str(medsegbench_root), "--steps", "2", "--seeds", "0", "1"]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    suite = json.loads(out.with_suffix(".json").read_text())
    assert [b["encoder"] for b in suite["benchmarks"]] == [str(ckpt), "random:resconv_tiny"]
    for b in suite["benchmarks"]:
        assert b["classes"] == ["foreground"] and b["n"] == {"train": 2, "test": 2}
        assert len(b["data_files"]["busi_128.npz"]) == 64
        assert [r["seed"] for r in b["runs"]] == [0, 1]
        assert all(0.0 <= r["dice"]["foreground"] <= 1.0 for r in b["runs"])
        assert b["summary"]["frozen"]["mean"]["n"] == 2
    text = out.with_suffix(".md").read_text()
    assert "# MedSegBench: busi 128" in text and "| `random:resconv_tiny` | frozen |" in text
    assert "bench medsegbench" in text  # the command that made it


def test_medsegbench_job_names_the_missing_file(tmp_path: Path, capsys):
    argv = ["bench", "medsegbench", "--encoder", "random:resconv_tiny", "--dataset", "busi"]
    assert main([*argv, "--root", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "busi_128.npz" in err and "Traceback" not in err
