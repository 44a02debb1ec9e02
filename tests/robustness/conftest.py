"""Fixtures of the robustness suite: every bad input, made at test time from the real files.

The generators live in :mod:`omnienc.benchmarks.robustness.badinputs` and
:mod:`omnienc.benchmarks.robustness.badcheckpoints`, which the robustness benchmark uses too
(``python -m omnienc.benchmarks.robustness``), so the tests and the results table try the same
inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omnienc.benchmarks.robustness.attacks import AttackContext
from omnienc.benchmarks.robustness.badinputs import make_bad_inputs, restore_permissions
from omnienc.benchmarks.robustness.cases import BadInput
from omnienc.benchmarks.robustness.observation import RunContext
from omnienc.checkpoint import save_encoder
from omnienc.encoders import build_encoder
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import HeadConfig, InContextHead


@pytest.fixture(scope="session")
def bad_inputs(
    tmp_path_factory: pytest.TempPathFactory, volumes: Path
) -> Iterator[dict[str, BadInput]]:
    """Every bad input of :func:`make_bad_inputs`, by case name, in a session tmp folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    try:
        yield {c.name: c for c in make_bad_inputs(volumes, root)}
    finally:
        restore_permissions(root)  # so that pytest can clean the folder up


@pytest.fixture(scope="session")
def segment_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported encoder with an in-context head (what ``omnienc segment`` needs)."""
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    head_config = HeadConfig(dim=16, num_heads=2)
    return save_encoder(
        encoder,
        tmp_path_factory.mktemp("checkpoint") / "encoder",
        Preprocessing(spacing=(6.0, 6.0, 6.0)),
        meta={"incontext_head": head_config.to_dict(), "crop_size": [32, 32, 32]},
        extra={"incontext_head": InContextHead(encoder.feature_info, head_config)},
    )


@pytest.fixture(scope="session")
def run_context(
    tmp_path_factory: pytest.TempPathFactory, volumes: Path, segment_checkpoint: Path
) -> RunContext:
    """Scratch folder, caches and checkpoint shared by every entry-point run of the session.

    One preprocessing and mask cache for the whole matrix: the good volume beside each bad file
    is processed once, which keeps the matrix fast.
    """
    return RunContext(
        volumes,
        tmp_path_factory.mktemp("robustness-run"),
        segment_checkpoint,
        "random:resconv_tiny",
    )


@pytest.fixture
def attack_context(tmp_path: Path, volumes: Path, segment_checkpoint: Path) -> AttackContext:
    """A scratch folder for one checkpoint attack."""
    return AttackContext(tmp_path, segment_checkpoint, volumes)
