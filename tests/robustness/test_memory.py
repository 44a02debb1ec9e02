"""Memory bounds: windowed encoding of large volumes, and peak RSS of ``omnienc embed``.

The fast tests check :func:`omnienc.embed.pooled_features` numerically: a grid that fits in one
window is encoded exactly as a whole-volume pass, windows are stitched exactly (checked against
encoding the halves by hand), and on a real MR the windowed embedding stays close to the
whole-volume one (instance normalisation sees one window at a time, so not equal). The slow
test measures the peak RSS of ``omnienc embed`` on the 512x512x300 CT and a 1024^3 volume
(:mod:`omnienc.benchmarks.robustness.memory`) against the stated bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.benchmarks.robustness.memory import (
    CHECKPOINT,
    REFUSED_MB,
    base_rss_mb,
    bound_mb,
    measure_case,
)
from omnienc.benchmarks.robustness.memory_inputs import MemoryInput, make_inputs
from omnienc.checkpoint import load_encoder
from omnienc.embed import DEFAULT_WINDOW, embed_inputs, pooled_features
from omnienc.encoders import build_encoder
from omnienc.io import read_volume
from omnienc.transforms import preprocess_volume


@pytest.fixture(scope="module")
def shipped():
    """The shipped encoder and its preprocessing."""
    encoder, pre = load_encoder(CHECKPOINT)
    return encoder.eval(), pre


@pytest.fixture(scope="module")
def mr_grid(shipped, volumes: Path) -> torch.Tensor:
    """A real T1 MR on the shipped encoder's 2 mm grid, ``(1, 1, X, Y, Z)`` (about 83x113x84)."""
    _, pre = shipped
    volume = read_volume(volumes / "niivue-images/chris_t1.nii.gz")
    return torch.from_numpy(preprocess_volume(volume, pre)["image"])[None]


def test_a_grid_within_the_window_is_encoded_whole_exactly(shipped, mr_grid: torch.Tensor):
    encoder, _ = shipped
    assert max(mr_grid.shape[2:]) <= DEFAULT_WINDOW
    with torch.inference_mode():
        whole = encoder(mr_grid).numpy()
    assert np.array_equal(pooled_features(encoder, mr_grid), whole)
    assert np.array_equal(pooled_features(encoder, mr_grid, window=0), whole)


def test_windows_are_stitched_exactly():
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny").eval()
    x = torch.randn(2, 1, 32, 24, 64)
    # window 32, no overlap: the last axis splits into [0, 32) and [32, 64); each window's
    # deepest map is 2x2x2 cells, and the stitched map's mean is the mean of the two.
    windowed = pooled_features(encoder, x, window=32, overlap=0.0)
    with torch.inference_mode():
        halves = (encoder(x[..., :32]) + encoder(x[..., 32:])) / 2
    np.testing.assert_allclose(windowed, halves.numpy(), rtol=1e-5, atol=1e-6)


def test_windowed_embedding_stays_close_to_the_whole_volume_pass(shipped, mr_grid):
    encoder, _ = shipped
    with torch.inference_mode():
        whole = encoder(mr_grid)[0].numpy()
    windowed = pooled_features(encoder, mr_grid, window=96)[0]  # two windows along Y
    cosine = float(windowed @ whole / (np.linalg.norm(windowed) * np.linalg.norm(whole)))
    relative = float(np.linalg.norm(windowed - whole) / np.linalg.norm(whole))
    assert cosine > 0.995 and relative < 0.1, (cosine, relative)


def test_window_too_small_for_the_encoder_is_refused(shipped, mr_grid):
    encoder, _ = shipped
    with pytest.raises(ValueError, match="window must be >= 32"):
        pooled_features(encoder, mr_grid, window=16)


def test_embed_inputs_passes_the_window_on(shipped, volumes: Path):
    encoder, pre = shipped
    spec = str(volumes / "nibabel/anatomical.nii")  # 33x41x25 at 2 mm
    whole = embed_inputs(encoder, pre, [spec], progress=False, window=0)
    windowed = embed_inputs(encoder, pre, [spec], progress=False, window=32)
    assert whole.features.shape == windowed.features.shape == (1, encoder.embed_dim)
    assert not np.array_equal(whole.features, windowed.features)


@pytest.mark.slow
def test_embed_peak_memory_on_a_512x512x300_ct_and_a_1024_cubed_volume(tmp_path: Path):
    base = base_rss_mb()
    rows = {}
    for item in make_inputs(tmp_path / "inputs", only=["512x512x300", "1024^3"]):
        rows[item.name] = (item, measure_case("embed", item, tmp_path, base))
    item, row = rows["512x512x300"]
    assert row["outcome"] == "ok", row
    assert row["peak_rss_mb"] <= bound_mb(item, base), row
    assert row["ok"]
    item, row = rows["1024^3"]
    assert row["outcome"] == "refused before allocating", row
    # Nothing of its 2 GiB (int16) was allocated: at most REFUSED_MB above the import base.
    assert row["peak_rss_mb"] <= base + REFUSED_MB, row
    assert row["ok"]


def test_the_bound_of_a_refused_input_is_far_below_its_size(tmp_path: Path):
    refused = MemoryInput("1024^3", tmp_path / "x.nii.gz", (1024,) * 3, (0.5,) * 3, refused=True)
    int16_mb = 1024**3 * 2 / 2**20
    assert bound_mb(refused, 1000.0) == 1000.0 + REFUSED_MB < 1000.0 + int16_mb / 10
