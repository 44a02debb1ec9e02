"""The test-time localisation diagnostic: its post-processing, and a tiny run on two CT crops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_fewshot_bench import CHECKPOINT, two_ct_crops

from omnienc.benchmarks.fewshot_localise import (
    PAIRED,
    VARIANTS,
    best_cut,
    largest_component,
    localise_markdown,
    run_localise,
    support_volume_in_query_voxels,
    top_voxels,
    voxel_auc,
)
from omnienc.benchmarks.registration import QUICK_REGISTRATION


def test_largest_component_keeps_the_bigger_blob():
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[5:8, 5:8, 5:8] = True  # 27 voxels
    out = largest_component(mask)
    assert out.sum() == 27 and out[6, 6, 6] and not out[0, 0, 0]
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


def test_top_voxels_takes_the_most_probable_within_the_region():
    prob = np.arange(27, dtype=np.float32).reshape(3, 3, 3) / 27
    top = top_voxels(prob, 5)
    assert top.sum() == 5 and top.ravel()[-5:].all()
    region = np.zeros_like(top)
    region[0] = True  # values 0..8 / 27
    inside = top_voxels(prob, 3, region)
    assert inside.sum() == 3 and inside[0].ravel()[-3:].all() and not inside[1:].any()
    assert top_voxels(prob, 0).sum() == 0
    assert top_voxels(prob, 1e9).sum() == 26  # clipped; the voxel at probability 0 never counts
    assert top_voxels(prob, 20, region).sum() == 8  # the region's 9 voxels, less the zero
    tied = np.full((2, 2, 2), 0.5, np.float32)
    assert top_voxels(tied, 3).sum() == 8  # ties at the cut are all kept


def test_support_volume_is_converted_to_query_voxels():
    # 1,000 voxels of 3 mm^3 and 500 of 1 mm^3: mean 1,750 mm^3; query voxels are 0.5 mm^3.
    v = support_volume_in_query_voxels([1000, 500], [(1, 1, 3), (1, 1, 1)], (0.5, 1, 1))
    assert v == pytest.approx(3500.0)


def test_voxel_auc_matches_sklearn_and_handles_degenerate_truths():
    rng = np.random.default_rng(0)
    prob = rng.random((6, 7, 8)).round(2)  # ties included
    truth = prob + rng.normal(0, 0.3, prob.shape) > 0.7
    assert voxel_auc(prob, truth) == pytest.approx(roc_auc_score(truth.ravel(), prob.ravel()))
    assert voxel_auc(prob, np.zeros_like(truth)) is None
    assert voxel_auc(prob, np.ones_like(truth)) is None
    assert voxel_auc(prob, truth.astype(np.uint8)) == voxel_auc(prob, truth)


def test_best_cut_is_the_best_threshold():
    rng = np.random.default_rng(1)
    prob = rng.random((5, 6, 7)).round(2)
    truth = prob + rng.normal(0, 0.2, prob.shape) > 0.6

    def dice(m: np.ndarray) -> float:
        return 2 * (m & truth).sum() / (m.sum() + truth.sum())

    best = max(dice(prob >= t) for t in np.unique(prob))
    cut = best_cut(prob, truth)
    assert dice(cut) == pytest.approx(best)
    assert dice(cut) >= dice(prob > 0.5)
    assert not best_cut(prob, np.zeros_like(truth)).any()


@pytest.fixture(scope="module")
def tiny_localise(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    tmp = tmp_path_factory.mktemp("localise")
    catalogue = two_ct_crops(volumes, tmp)
    return run_localise(
        str(CHECKPOINT),
        tmp,
        catalogue=catalogue,
        min_voxels=200,
        registration=QUICK_REGISTRATION,
        progress=False,
    )


def test_tiny_run_scores_every_variant_on_cross_scan_queries(tiny_localise: dict):
    p = tiny_localise
    assert p["rows"] and all(r["group"] == "CT" for r in p["rows"])
    for row in p["rows"]:
        assert set(row["dice"]) == set(VARIANTS), row["structure"]
        s = row["scores"]
        assert 0.0 <= s["head"]["auc"] <= 1.0
        # The atlas variants only take voxels away from what they restrict.
        assert s["head_atlas"]["pred_voxels"] <= s["head"]["pred_voxels"]
        assert s["head_component"]["pred_voxels"] <= s["head"]["pred_voxels"]
        # The oracle volume is the truth's (more only with ties at the cut).
        assert s["head_volume_oracle"]["pred_voxels"] >= row["query_voxels"]
        # No threshold of the head's map beats the best cut (p > 0.5 is one threshold).
        assert s["head_best_cut"]["dice"] >= s["head"]["dice"] - 1e-3
        assert s["head_times_registration"]["pred_voxels"] <= s["head"]["pred_voxels"] + 1
    cell = p["summary"]["cells"]["CT"]
    assert set(cell) == set(VARIANTS) and cell["head"]["n"] == len(p["rows"])
    assert set(p["paired"]["CT"]) == {f"{a} - {b}" for a, b in PAIRED}
    text = localise_markdown({**p, "command": "python -m omnienc.benchmarks.fewshot_localise"})
    assert "| CT |" in text and "head_volume_oracle" in text


def test_a_checkpoint_without_a_head_is_refused_before_any_query(volumes: Path, tmp_path: Path):
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    headless = tmp_path / "headless"
    shutil.copytree(CHECKPOINT, headless)
    (headless / "incontext_head.safetensors").unlink()
    config = json.loads((headless / "config.json").read_text())
    config["extra"] = {}
    (headless / "config.json").write_text(json.dumps(config))
    catalogue = two_ct_crops(volumes, tmp_path)
    with pytest.raises(ValueError, match="needs \\['head'"):
        run_localise(str(headless), tmp_path, catalogue=catalogue, min_voxels=200, progress=False)
