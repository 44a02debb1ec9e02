"""Pretraining recipes in configs/: each parses; the inpainting one is the shipped one + a loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from omnienc.pretext.train import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "align")


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_pretraining_recipe_parses(path: Path) -> None:
    config, _, _ = parse_config(["--config", str(path)])
    assert config.model.method  # a valid objective set


def test_inpaint_recipe_is_the_shipped_recipe_plus_the_inpainting_loss() -> None:
    shipped, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min.yaml")])
    inpaint, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min-inpaint.yaml")])
    assert inpaint.model.inpaint_weight == 1.0 and shipped.model.inpaint_weight == 0.0
    assert inpaint.model.method == "incontext+ntxent+inpaint"
    same_model = dataclasses.replace(inpaint.model, inpaint_weight=0.0)
    assert same_model == shipped.model
    assert inpaint.data == shipped.data and inpaint.trainer == shipped.trainer
    assert inpaint.seed == shipped.seed and inpaint.run_dir != shipped.run_dir


def test_mp_recipe_is_the_shipped_recipe_plus_the_peer_objective() -> None:
    shipped, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min.yaml")])
    mp, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min-mp.yaml")])
    assert mp.model.monai_ssl_weight == 1.0 and shipped.model.monai_ssl_weight == 0.0
    assert mp.model.method == "incontext+ntxent+monai_ssl(inpaint+rotation+contrastive)"
    # Only the added objective and the schedule (each step costs more) differ.
    assert mp.model.schedule_steps is not None and shipped.model.schedule_steps is not None
    assert mp.model.schedule_steps < shipped.model.schedule_steps
    same = dataclasses.replace(
        mp.model, monai_ssl_weight=0.0, schedule_steps=shipped.model.schedule_steps
    )
    assert same == shipped.model
    assert mp.data == shipped.data and mp.trainer == shipped.trainer
    assert mp.run_dir != shipped.run_dir


def test_matching_recipe_is_the_mp_recipe_plus_the_matching_loss() -> None:
    mp, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min-mp.yaml")])
    match, _, _ = parse_config(["--config", str(CONFIGS / "cpu-30min-mp-match.yaml")])
    assert match.model.matching_weight == 1.0 and mp.model.matching_weight == 0.0
    assert match.model.method == mp.model.method.replace("ntxent+", "ntxent+matching+")
    assert dataclasses.replace(match.model, matching_weight=0.0) == mp.model
    assert match.data == mp.data and match.trainer == mp.trainer
    assert match.seed == mp.seed and match.run_dir != mp.run_dir
