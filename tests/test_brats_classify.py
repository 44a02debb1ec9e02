"""The BraTS crop-classification benchmark: crop rules, leave-one-case-out, report, bad inputs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from omnienc.benchmarks.brats_budget import QUICK_BUDGET, BratsBudget, budget_from_options
from omnienc.benchmarks.brats_classify import (
    default_command,
    encoder_setup,
    format_brats_classification_markdown,
    main,
    summary_metrics,
)
from omnienc.benchmarks.brats_crops import (
    CropSampling,
    PreparedCase,
    box_counts,
    cut_crops,
    prepare_case,
    sample_case_crops,
    sample_centres,
)
from omnienc.benchmarks.brats_loco import (
    ScratchBudget,
    intensity_features,
    loco_folds,
    probe_loco,
    stratified_bootstrap,
    summarise,
    train_scratch,
)
from omnienc.checkpoint import load_checkpoint_config, save_encoder
from omnienc.data.brats import BRAIN_MASK_FILE, LABEL_FILE, SEQUENCES, BratsCase, find_brats_cases
from omnienc.encoders import build_encoder
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "omnienc-cpu30min"
SAMPLING = CropSampling(per_class=6, min_distance=8.0)


@pytest.fixture(scope="module")
def pre() -> Preprocessing:
    return Preprocessing.from_dict(load_checkpoint_config(SHIPPED)["preprocessing"])


@pytest.fixture(scope="module")
def case(data_root: Path) -> BratsCase:
    return find_brats_cases(data_root)[0]


@pytest.fixture(scope="module")
def prepared(case: BratsCase, pre: Preprocessing) -> PreparedCase:
    return prepare_case(case, pre, ("flair",))


def copy_case(case: BratsCase, dest: Path, **arrays: np.ndarray) -> BratsCase:
    """A copy of a case folder, with ``label``, ``brain`` or ``t1c`` arrays written over."""
    folder = dest / case.name
    folder.mkdir(parents=True)
    for name in (*SEQUENCES.values(), LABEL_FILE, BRAIN_MASK_FILE):
        shutil.copyfile(case.folder / name, folder / name)
    files = {"label": LABEL_FILE, "brain": BRAIN_MASK_FILE, "t1c": SEQUENCES["t1c"]}
    affine = nib.load(case.label_path).affine  # type: ignore[attr-defined]
    for key, array in arrays.items():
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine), folder / files[key])
    return BratsCase(case.name, folder)


def window(mask: np.ndarray, centre: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """The crop of ``mask`` centred on ``centre``, cut by hand (beyond the grid: False)."""
    out = np.zeros(size, bool)
    src, dst = [], []
    for c, s, n in zip(centre, size, mask.shape, strict=True):
        lo = int(c) - s // 2
        src.append(slice(max(lo, 0), min(lo + s, n)))
        dst.append(slice(max(lo, 0) - lo, min(lo + s, n) - lo))
    out[tuple(dst)] = mask[tuple(src)]
    return out


# ------------------------------------------------------------------------------ crop sampling


def test_box_counts_match_a_naive_count() -> None:
    mask = np.random.default_rng(0).random((9, 7, 5)) > 0.6
    size = (4, 3, 5)
    counts = box_counts(mask, size)
    for c in itertools.product(*(range(n) for n in mask.shape)):
        assert counts[c] == window(mask, np.array(c), size).sum()


def test_sample_centres_keep_the_distance_and_follow_the_weights() -> None:
    grid = np.argwhere(np.ones((10, 10, 10), bool))
    rng = np.random.default_rng(0)
    centres = sample_centres(grid, 30, 3.0, rng)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert len(centres) == 30 and dist[np.triu_indices(30, 1)].min() >= 3.0
    weights = (grid[:, 0] < 5).astype(float)  # only the first half may be drawn first
    assert (sample_centres(grid, 5, 3.0, rng, weights)[:, 0] < 5).all()
    assert len(sample_centres(grid, 10_000, 3.0, rng)) < 200  # runs out, returns fewer


def test_crops_follow_the_rules_on_a_real_case(prepared: PreparedCase) -> None:
    crops = sample_case_crops(prepared, SAMPLING)
    size, n = SAMPLING.crop_size, SAMPLING.per_class
    assert crops.labels.tolist() == [0] * n + [1] * n
    for centre, label, fraction in zip(
        crops.centres, crops.labels, crops.brain_fraction, strict=True
    ):
        brain = window(prepared.brain, centre, size)
        assert fraction == pytest.approx(brain.mean()) and fraction >= 0.5
        if label == 1:
            assert prepared.tumour[tuple(centre)]
        else:
            assert prepared.brain[tuple(centre)]
            assert not window(prepared.tumour, centre, size).any()
    for label in (0, 1):
        c = crops.centres[crops.labels == label]
        dist = np.linalg.norm(c[:, None] - c[None], axis=-1)
        assert dist[np.triu_indices(len(c), 1)].min() >= SAMPLING.min_distance


def test_crop_sampling_is_seeded(prepared: PreparedCase) -> None:
    a = sample_case_crops(prepared, SAMPLING).centres
    b = sample_case_crops(prepared, SAMPLING).centres
    other = sample_case_crops(prepared, dataclasses.replace(SAMPLING, seed=1)).centres
    assert np.array_equal(a, b) and not np.array_equal(a, other)


def test_cut_crops_pad_with_the_image_minimum(prepared: PreparedCase) -> None:
    image = prepared.images["flair"]
    centres = np.array([[60, 60, 39], [0, 0, 0]])
    crops = cut_crops(image, centres, (32, 32, 32))
    assert crops.shape == (2, 1, 32, 32, 32) and crops.dtype == np.float32
    assert np.array_equal(crops[0, 0], image[44:76, 44:76, 23:55])
    assert np.array_equal(crops[1, 0, 16:, 16:, 16:], image[:16, :16, :16])
    assert (crops[1, 0, :16] == image.min()).all()


def test_intensity_features_are_crop_and_centre_statistics() -> None:
    crops = np.random.default_rng(0).normal(size=(3, 1, 16, 16, 16)).astype(np.float32)
    feats = intensity_features(crops)
    assert feats.shape == (3, 14)
    assert feats[1, 0] == pytest.approx(crops[1].mean(), abs=1e-6)
    assert feats[1, 7] == pytest.approx(crops[1, 0, 6:10, 6:10, 6:10].mean(), abs=1e-6)
    assert feats[1, 11] == pytest.approx(np.median(crops[1, 0, 6:10, 6:10, 6:10]), abs=1e-6)


# ------------------------------------------------------------------------ leave-one-case-out


def test_loco_never_puts_a_case_in_its_own_test_fold() -> None:
    cases = np.array(list("abcd" * 5))
    folds = loco_folds(cases)
    assert [name for name, _, _ in folds] == ["a", "b", "c", "d"]
    for name, train, test in folds:
        assert set(cases[test]) == {name} and name not in set(cases[train])
        assert sorted([*train, *test]) == list(range(len(cases)))
    with pytest.raises(ValueError, match="at least two cases"):
        loco_folds(["a", "a"])


def test_probe_loco_scores_every_crop_out_of_fold() -> None:
    rng = np.random.default_rng(0)
    cases = np.repeat(["a", "b", "c"], 20)
    y = np.tile(np.repeat([0, 1], 10), 3)
    x = y[:, None] + rng.normal(0, 0.5, (60, 4))
    scores, params = probe_loco(x, y, cases)
    assert np.isfinite(scores).all() and roc_auc_score(y, scores) > 0.9
    assert set(params) == {"a", "b", "c"} and all(
        p["inner_auc"] is not None for p in params.values()
    )
    _, fixed = probe_loco(x[:40], y[:40], cases[:40])  # one training case: C is fixed
    assert all(p["C"] == pytest.approx(0.1) and p["inner_auc"] is None for p in fixed.values())


def test_summarise_pools_folds_and_bootstraps_within_strata() -> None:
    rng = np.random.default_rng(0)
    cases = np.repeat(["a", "b", "c", "d"], 10)
    y = np.tile(np.repeat([0, 1], 5), 4)
    seeds = [y + rng.normal(0, 1, 40) for _ in range(2)]
    out = summarise(seeds, y, cases, n_boot=200)
    pooled = [roc_auc_score(y, s) for s in seeds]
    assert out["seed_aucs"] == pytest.approx(pooled) and out["auc"] == pytest.approx(
        np.mean(pooled)
    )
    assert out["spread"] == pytest.approx(np.std(pooled, ddof=1))
    assert out["interval"][0] <= out["auc"] <= out["interval"][1]
    rows = cases == "b"
    fold = np.mean([roc_auc_score(y[rows], s[rows]) for s in seeds])
    assert out["fold_aucs"]["b"] == pytest.approx(fold)
    idx = stratified_bootstrap(y, cases, 50)
    for name, label in itertools.product("abcd", (0, 1)):
        stratum = set(np.flatnonzero((cases == name) & (y == label)))
        assert all(set(row[list(stratum)]) <= stratum for row in idx)


def test_train_scratch_returns_test_probabilities() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 1, 16, 16, 16)).astype(np.float32)
    labels = np.repeat([0, 1], 4)
    images[labels == 1, :, 6:10, 6:10, 6:10] += 3.0
    proba = train_scratch(
        build_encoder("resconv_tiny"),
        (images, labels),
        images[:3],
        ScratchBudget(steps=2, batch_size=4),
    )
    assert proba.shape == (3,) and ((proba >= 0) & (proba <= 1)).all()


# --------------------------------------------------------------------------------- bad inputs


def test_a_case_without_tumour_names_its_label_file(
    case: BratsCase, pre: Preprocessing, tmp_path: Path
) -> None:
    bad = copy_case(case, tmp_path, label=np.zeros((240, 240, 155)))
    with pytest.raises(DataError, match="has no tumour voxel") as err:
        prepare_case(bad, pre, ("flair",))
    assert err.value.path == bad.label_path


def test_a_case_with_too_little_brain_names_its_brain_mask(
    case: BratsCase, pre: Preprocessing, tmp_path: Path
) -> None:
    labels = np.asarray(nib.load(case.label_path).dataobj)  # type: ignore[attr-defined]
    bad = copy_case(case, tmp_path, brain=labels > 0)  # the brain is the tumour alone
    with pytest.raises(DataError, match="only 0 tumour-free crops") as err:
        sample_case_crops(prepare_case(bad, pre, ("flair",)), SAMPLING)
    assert err.value.path == bad.brain_mask_path and case.name in str(err.value)


def test_a_tumour_too_small_for_the_crops_names_the_label_file(
    case: BratsCase, pre: Preprocessing, tmp_path: Path
) -> None:
    labels = np.zeros((240, 240, 155))
    labels[117:123, 117:123, 74:80] = 2  # 6 mm of oedema mid-brain: room for one crop centre
    bad = copy_case(case, tmp_path, label=labels)
    with pytest.raises(DataError, match="only 1 tumour crops centred in the whole tumour") as err:
        sample_case_crops(prepare_case(bad, pre, ("flair",)), SAMPLING)
    assert err.value.path == bad.label_path


def test_a_sequence_on_another_grid_names_its_file(
    case: BratsCase, pre: Preprocessing, tmp_path: Path
) -> None:
    bad = copy_case(case, tmp_path, t1c=np.zeros((240, 240, 150)))
    with pytest.raises(DataError, match="must be co-registered") as err:
        prepare_case(bad, pre, ("flair", "t1c"))
    assert err.value.path == bad.image_path("t1c")


# ------------------------------------------------------------------------- end to end, report

TINY = ["--per-class", "4", "--floor-seeds", "1", "--scratch-seeds", "1", "--scratch-steps", "2"]
TINY += ["--scratch-batch", "4", "--n-boot", "50", "--sequences", "flair", "-q"]


@pytest.fixture(scope="module")
def payload(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny run of the command line on two real cases with the shipped checkpoint."""
    root = tmp_path_factory.mktemp("data")
    (root / "volumes" / "brats").mkdir(parents=True)
    for case in find_brats_cases(data_root)[:2]:
        (root / "volumes" / "brats" / case.name).symlink_to(case.folder)
    out = root / "out" / "brats_classify"
    assert main(["--encoder", str(SHIPPED), "--data", str(root), "--out", str(out), *TINY]) == 0
    assert out.with_suffix(".md").read_text().startswith("# BraTS")
    return json.loads(out.with_suffix(".json").read_text())


def test_end_to_end_payload(payload: dict[str, Any]) -> None:
    methods = [(r["encoder"], r["method"]) for r in payload["rows"]]
    expected = [("pretrained", "linear"), ("random-init", "linear"), ("–", "intensity")]
    assert methods == [*expected, ("random-init", "scratch")]
    assert len(payload["cases"]) == 2 and payload["sampling"]["per_class"] == 4
    for r in payload["rows"]:
        assert 0 <= r["interval"][0] <= r["auc"] <= r["interval"][1] <= 1
        assert len(r["fold_aucs"]) == 2
    weights = load_checkpoint_config(SHIPPED)["weights"]["sha256"]
    assert payload["encoder"]["checkpoint"] == f"sha256:{weights}"
    assert payload["floor"] == ["random:resconv_small:0"]
    assert len(payload["data_files"]) == 6  # FLAIR, labels and brain mask of two cases
    assert payload["pyradiomics"] == {
        "cases": {},
        "evaluated": False,
        "reason": "the files are absent",
    }
    assert payload["command"].startswith("python -m omnienc.benchmarks.brats_classify --encoder")
    assert payload["seconds"]["total"] > 0 and payload["machine"]["cpu"]


def test_markdown_and_summary_metrics(payload: dict[str, Any]) -> None:
    text = format_brats_classification_markdown(payload)
    assert "| FLAIR | **pretrained** | linear probe (frozen) |" in text
    assert "intensity statistics + logistic regression" in text
    assert "not evaluated: the files are absent" in text
    metrics = summary_metrics(payload)
    assert set(metrics) == {
        "brats_flair_tumour_auc",
        "brats_flair_tumour_auc_floor",
        "brats_flair_intensity_auc",
        "brats_flair_scratch_auc",
        "brats_brain_fraction_auc",
    }
    assert metrics["brats_flair_tumour_auc"] == payload["rows"][0]["auc"]
    # A random-init encoder under test is its own floor: no floor key.
    floor_only = {
        **payload,
        "encoder": {**payload["encoder"], "label": "random-init"},
        "rows": payload["rows"][1:],
    }
    metrics = summary_metrics(floor_only)
    assert "brats_flair_tumour_auc_floor" not in metrics
    assert metrics["brats_flair_tumour_auc"] == payload["rows"][1]["auc"]


def test_default_command_names_what_differs_from_the_mode() -> None:
    budget = budget_from_options(QUICK_BUDGET, {"per_class": 6, "floor_seeds": 2})
    assert budget.floor_seeds == (0, 1) and budget.scratch == QUICK_BUDGET.scratch
    command = default_command("ckpt", None, True, 0, budget, ("t1c",))
    assert command.endswith("--encoder ckpt --quick --sequences t1c --per-class 6 --floor-seeds 2")
    assert default_command("ckpt", None, False, 0, BratsBudget()).endswith("--encoder ckpt")


@pytest.mark.parametrize(
    ("spacing", "crop", "expected"),
    [
        ((2.0, 2.0, 2.0), (32, 32, 32), (32, 32, 32)),  # the shipped recipe: unchanged
        ((4.0, 4.0, 4.0), (32, 32, 32), (16, 16, 16)),  # 128 mm capped at 64 mm
        ((3.0, 3.0, 3.0), (32, 32, 32), (21, 21, 21)),
        ((1.0, 1.0, 1.0), (48, 48, 48), (48, 48, 48)),  # within 64 mm: the encoder's own crop
    ],
)
def test_crops_are_capped_at_a_physical_size(tmp_path: Path, spacing, crop, expected) -> None:
    path = save_encoder(
        build_encoder("resconv_tiny"),
        tmp_path / "enc",
        Preprocessing(spacing=spacing),
        meta={"crop_size": list(crop)},
    )
    _, pre, size = encoder_setup(path)
    assert pre.spacing == spacing and size == expected
