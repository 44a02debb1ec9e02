"""configs/gpu-mass.yaml: its resolved values, and a few CPU steps of it with tiny overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.encoders import build_encoder
from omnienc.pretext.train import main, parse_config

CONFIG = "configs/gpu-mass.yaml"
TINY = [
    "--trainer.max_steps",
    "2",
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32",
    "--trainer.enable_progress_bar",
    "false",
    "--data.pair.crop_size",
    "[32,32,32]",
    "--data.preprocessing.spacing",
    "[3.0,3.0,3.0]",
    "--data.steps_per_epoch",
    "2",
    "--data.num_workers",
    "0",
    "--data.mask_workers",
    "1",
    "--data.pair.max_tasks",
    "2",
]


def test_resolved_values() -> None:
    config, _, _ = parse_config(["--config", CONFIG])
    assert config.model.encoder == "resconv_mass"
    assert config.data.pair.crop_size == (128, 128, 128)
    assert tuple(config.data.preprocessing.spacing) == (1.5, 1.5, 1.5)
    assert config.data.batch_size == 2 and config.data.num_workers == 15
    assert config.trainer["precision"] == "bf16-mixed" and config.trainer["accelerator"] == "gpu"
    enc = build_encoder(config.model.encoder)
    assert [f["num_chs"] for f in enc.feature_info] == [32, 64, 128, 256, 512]
    assert [f["reduction"] for f in enc.feature_info] == [1, 2, 4, 8, 16]


def test_multi_node_trainer_options_are_accepted() -> None:
    argv = ["--config", CONFIG, "--trainer.strategy", "ddp", "--trainer.num_nodes", "4"]
    config, _, _ = parse_config([*argv, "--trainer.devices", "8"])
    # Lightning takes devices as an int or a string such as "8" (jsonargparse keeps the string).
    assert config.trainer["num_nodes"] == 4 and int(config.trainer["devices"]) == 8
    assert config.trainer["strategy"] == "ddp"


@pytest.mark.slow
def test_a_few_cpu_steps_of_the_recipe(tmp_path: Path, volumes: Path) -> None:
    (tmp_path / "data" / "volumes").mkdir(parents=True)
    shutil.copyfile(volumes / "nibabel/anatomical.nii", tmp_path / "data/volumes/anatomical.nii")
    run = tmp_path / "run"
    argv = ["--config", CONFIG, *TINY, "--data_root", str(tmp_path / "data")]
    argv += ["--run_dir", str(run), "--data.cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    config = load_checkpoint_config(run / "encoder")
    assert config["arch"] == "resconv_mass" and config["meta"]["step"] == 2
    assert config["preprocessing"]["spacing"] == [3.0, 3.0, 3.0]
    assert load_encoder(run / "encoder")[0].embed_dim == 512


@pytest.mark.parametrize(
    ("env", "first"),
    [
        ({}, True),
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "3"}, False),
        ({"RANK": "1"}, False),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    ],
)
def test_only_global_rank_zero_writes_run_files(monkeypatch, env: dict, first: bool) -> None:
    """Under srun or torchrun every process starts main(); only rank 0 of node 0 tidies."""
    from omnienc.pretext.train import _is_first_process

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _is_first_process() is first
