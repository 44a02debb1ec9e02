"""The negative-support diagnostic: its negatives, its rule, and a tiny run on two CT crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_fewshot_bench import CHECKPOINT, two_ct_crops

from omnienc.benchmarks.fewshot_negatives import (
    MIN_IN_CROP,
    NEGATIVES,
    VARIANTS,
    beats_negatives,
    negative_masks,
    negatives_markdown,
    run_negatives,
)


def _blob(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


def test_negatives_are_proposals_outside_the_structure_and_a_ring():
    shape = (40, 40, 40)
    mask = _blob(shape, (15, 15, 15), (25, 25, 25))  # 1,000 voxels
    same = mask.copy()  # the structure itself: refused
    overlapping = _blob(shape, (10, 10, 10), (25, 25, 25))  # holds the whole structure: refused
    tiny = _blob(shape, (0, 0, 0), (3, 3, 3))  # 27 voxels: under MIN_IN_CROP in the crop
    beside = [_blob(shape, (26, 0, 0), (40, 40, 8 + i)) for i in range(NEGATIVES + 2)]
    proposals = np.stack([same, overlapping, tiny, *beside])
    body = np.ones(shape, bool)
    out = negative_masks(mask, proposals, body, (32, 32, 32), (2.0, 2.0, 2.0))
    assert len(out["proposals"]) == NEGATIVES  # the first NEGATIVES that qualify
    for crop in out["proposals"]:
        assert crop.shape == (32, 32, 32) and crop.dtype == np.float32
        assert crop.sum() >= MIN_IN_CROP
    # The crop is centred on the structure's box (15..24): it sits at 11..20 of the crop.
    assert out["proposals"][0][11:21, 11:21, 11:21].sum() == 0
    (ring,) = out["ring"]
    assert ring[11:21, 11:21, 11:21].sum() == 0  # outside the structure
    assert ring[6:11, 11:21, 11:21].all() and not ring[5, 16, 16]  # 10 mm = 5 voxels wide
    none = negative_masks(mask, proposals[:3], np.zeros(shape, bool), (32, 32, 32), (2, 2, 2))
    assert none == {"proposals": [], "ring": []}  # no body, no ring


def test_a_voxel_is_kept_where_the_structure_beats_every_negative():
    prob = np.array([0.9, 0.6, 0.6, 0.2], np.float32).reshape(4, 1, 1)
    negs = [np.array([0.1, 0.7, 0.1, 0.0], np.float32).reshape(4, 1, 1)]
    negs.append(np.array([0.95, 0.0, 0.5, 0.0], np.float32).reshape(4, 1, 1))
    out = beats_negatives(prob, negs)
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.6, 0.2])
    np.testing.assert_array_equal(beats_negatives(prob, []), prob)  # no negative: the head


@pytest.fixture(scope="module")
def tiny_negatives(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    tmp = tmp_path_factory.mktemp("negatives")
    catalogue = two_ct_crops(volumes, tmp)
    return run_negatives(str(CHECKPOINT), tmp, catalogue=catalogue, min_voxels=200, progress=False)


def test_tiny_run_scores_every_variant_on_cross_scan_queries(tiny_negatives: dict):
    p = tiny_negatives
    assert p["rows"] and all(r["group"] == "CT" for r in p["rows"])
    for row in p["rows"]:
        assert set(row["dice"]) == set(VARIANTS), row["structure"]
        s = row["scores"]
        for v in VARIANTS[1:]:  # negatives only take voxels away (up to resampling)
            assert s[v]["pred_voxels"] <= s["head"]["pred_voxels"] + 1, v
        assert s["head_vs_both"]["pred_voxels"] <= s["head_vs_ring"]["pred_voxels"] + 1
    assert set(p["paired"]["CT"]) == {f"{v} - head" for v in VARIANTS[1:]}
    text = negatives_markdown({**p, "command": "python -m omnienc.benchmarks.fewshot_negatives"})
    assert "| CT |" in text and "head_vs_proposals" in text
