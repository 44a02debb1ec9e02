"""omnienc pretrain on real volumes: config handling, export, resume, kill -9, DDP, bad runs."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.cli import main

OMNIENC = str(Path(sys.executable).with_name("omnienc"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, volumes: Path) -> Path:
    """A data root with three small real volumes (CT, MR, MR) under volumes/."""
    import shutil

    root = tmp_path_factory.mktemp("data")
    dest = root / "volumes"
    dest.mkdir()
    for rel in (
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/example_mr_sm.nii.gz",
        "nibabel/anatomical.nii",
    ):
        shutil.copyfile(volumes / rel, dest / Path(rel).name)
    return root


def _config(tmp_path: Path, data: Path, **trainer: object) -> Path:
    cfg = {
        "model": {"encoder": "resconv_tiny", "warmup_steps": 2, "head": {"dim": 16}},
        "data": {
            "roots": ["volumes"],
            "batch_size": 2,
            "steps_per_epoch": 2,
            "pair": {"crop_size": [32, 32, 32], "max_tasks": 2},
            "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "cache_dir": str(tmp_path / "cache"),
        },
        "trainer": {"accelerator": "cpu", "max_steps": 4, "enable_progress_bar": False, **trainer},
        "data_root": str(data),
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run: Path) -> dict[int, float]:
    """Logged losses by step, over every invocation's log version (a resume adds one)."""
    losses = {}
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        for r in csv.DictReader(open(path)):
            if r.get("train/loss"):
                losses[int(r["step"])] = float(r["train/loss"])
    return losses


def test_pretrain_exports_a_loadable_encoder(tmp_path: Path, tiny_data: Path):
    cfg = _config(tmp_path, tiny_data, log_every_n_steps=1)
    assert main(["pretrain", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    _, pre = load_encoder(run / "encoder")
    assert pre.spacing == (3.0, 3.0, 3.0)
    meta = load_checkpoint_config(run / "encoder")["meta"]
    assert meta["step"] == 4 and meta["pretext"] == "incontext+ntxent"
    assert meta["crop_size"] == [32, 32, 32]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["encoder"] == "resconv_tiny"
    assert saved["trainer"]["max_steps"] == 4
    assert (run / "checkpoints" / "last.ckpt").is_file()
    losses = _losses(run)
    assert len(losses) >= 3 and all(v == v and abs(v) < 1e6 for v in losses.values())
    assert not list(run.rglob("*.tmp*"))


def test_checkpoint_written_every_epoch_not_only_at_the_end(
    tmp_path: Path, tiny_data: Path, monkeypatch
):
    import pytorch_lightning as pl

    saved: list[int] = []
    save = pl.Trainer.save_checkpoint

    def record(trainer: pl.Trainer, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved.append(trainer.global_step)
        return save(trainer, path, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", record)
    cfg = _config(tmp_path, tiny_data, max_steps=6)  # steps_per_epoch 2: epochs end at 2, 4, 6
    assert main(["pretrain", "--config", str(cfg)]) == 0
    assert saved == [2, 4, 6]
    last = tmp_path / "run/checkpoints/last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6


def test_contrastive_only_exports_no_untrained_head(tmp_path: Path, tiny_data: Path):
    cfg = _config(tmp_path, tiny_data, max_steps=2)
    assert main(["pretrain", "--config", str(cfg), "--model.incontext_weight", "0"]) == 0
    config = load_checkpoint_config(tmp_path / "run" / "encoder")
    assert config["meta"]["pretext"] == "ntxent"
    assert "incontext_head" not in config.get("extra", {})


def test_monai_ssl_recipe_trains_the_same_encoder(tmp_path: Path, tiny_data: Path):
    cfg = _config(tmp_path, tiny_data, max_steps=3, log_every_n_steps=1)
    assert main(["pretrain", "--config", str(cfg), "--model.recipe", "monai_ssl"]) == 0
    run = tmp_path / "run"
    encoder, _ = load_encoder(run / "encoder")
    assert encoder.family == "resconv"
    config = load_checkpoint_config(run / "encoder")
    assert config["meta"]["pretext"] == "monai_ssl(inpaint+rotation+contrastive)"
    assert config["meta"]["step"] == 3
    assert "incontext_head" not in config.get("extra", {})
    losses = _losses(run)
    assert len(losses) == 3 and all(v == v for v in losses.values())


def test_monai_ssl_recipe_rejects_an_unknown_recipe(tmp_path: Path, tiny_data: Path, capsys):
    cfg = _config(tmp_path, tiny_data)
    assert main(["pretrain", "--config", str(cfg), "--model.recipe", "mae"]) == 2
    assert "recipe must be one of" in capsys.readouterr().err


def test_overrides_and_unknown_keys(tmp_path: Path, tiny_data: Path, capsys):
    cfg = _config(tmp_path, tiny_data)
    code = main(["pretrain", "--config", str(cfg), "--model.no_such_key", "1"])
    assert code == 2
    assert "no_such_key" in capsys.readouterr().err
    code = main(["pretrain", "--config", str(cfg), "--data.pair.crop_size", "[32, 32]"])
    assert code == 2


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path: Path, tiny_data: Path):
    full = tmp_path / "full"
    full.mkdir()
    cfg_full = _config(full, tiny_data, log_every_n_steps=1, deterministic=True)
    assert main(["pretrain", "--config", str(cfg_full)]) == 0

    part = tmp_path / "part"
    part.mkdir()
    cfg_part = _config(part, tiny_data, log_every_n_steps=1, deterministic=True)
    assert main(["pretrain", "--config", str(cfg_part), "--trainer.max_steps", "2"]) == 0
    assert main(["pretrain", "--config", str(cfg_part)]) == 0  # resumes from last.ckpt
    meta = load_checkpoint_config(part / "run" / "encoder")["meta"]
    assert meta["step"] == 4
    a, b = _losses(full / "run"), _losses(part / "run")
    assert len(list((part / "run" / "logs").glob("version_*"))) == 2  # no log overwritten
    for step in (0, 1, 2, 3):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_resume_never_refuses_an_existing_run(tmp_path: Path, tiny_data: Path, capsys):
    cfg = _config(tmp_path, tiny_data, max_steps=2)
    assert main(["pretrain", "--config", str(cfg)]) == 0
    assert main(["pretrain", "--config", str(cfg), "--resume", "never"]) == 1
    assert "resume=never" in capsys.readouterr().err


def test_resume_with_another_encoder_names_the_checkpoint(tmp_path: Path, tiny_data: Path, capsys):
    cfg = _config(tmp_path, tiny_data, max_steps=2)
    assert main(["pretrain", "--config", str(cfg)]) == 0
    more = ["--trainer.max_steps", "4", "--model.encoder", "resconv_small"]
    assert main(["pretrain", "--config", str(cfg), *more]) == 1
    err = capsys.readouterr().err
    assert "last.ckpt: was written by a different model" in err and "Traceback" not in err
    assert "checkpoint (" in err and "vs model (" in err  # the shapes that differ


def test_a_bad_file_is_skipped_with_one_warning(
    tmp_path: Path, tiny_data: Path, caplog: pytest.LogCaptureFixture
):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "volumes" / "broken.nii.gz").write_bytes(b"")
    cfg = _config(tmp_path, data, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="omnienc"):
        assert main(["pretrain", "--config", str(cfg)]) == 0
    assert caplog.text.count("broken.nii.gz") == 1, caplog.text


def test_non_finite_loss_stops_with_a_clear_error(tmp_path: Path, tiny_data: Path, capsys):
    cfg = _config(tmp_path, tiny_data, max_steps=6)
    code = main(
        ["pretrain", "--config", str(cfg), "--model.lr", "1e30", "--model.warmup_steps", "0"]
    )
    assert code == 1
    assert "non-finite training loss" in capsys.readouterr().err


def test_empty_volume_folder_is_a_clear_error(tmp_path: Path, capsys):
    data = tmp_path / "data"
    (data / "volumes").mkdir(parents=True)
    cfg = _config(tmp_path, data)
    assert main(["pretrain", "--config", str(cfg)]) == 1
    assert "no usable volume" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_minus_9_then_resume(tmp_path: Path, tiny_data: Path):
    cfg = _config(tmp_path, tiny_data, max_steps=40)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [OMNIENC, "pretrain", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert last.exists(), "no checkpoint appeared"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kill landed mid-run: the checkpoint is a periodic one, not the end-of-training one.
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= killed_at < 40, killed_at
    assert load_encoder(run / "encoder")  # the export survived the kill
    out = subprocess.run(
        [OMNIENC, "pretrain", "--config", str(cfg)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stderr
    assert load_checkpoint_config(run / "encoder")["meta"]["step"] == 40
    assert not list(run.rglob("*.tmp*"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, tiny_data: Path):
    cfg = _config(tmp_path, tiny_data, max_steps=3)
    out = subprocess.run(
        [
            OMNIENC,
            "pretrain",
            "--config",
            str(cfg),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    load_encoder(tmp_path / "run" / "encoder")
    assert load_checkpoint_config(tmp_path / "run" / "encoder")["meta"]["step"] == 3
