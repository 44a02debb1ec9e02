"""``omnienc bench fewshot``: the pair catalogue, the report, bad inputs, a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from omnienc.benchmarks.fewshot import (
    METHODS,
    add_fewshot_arguments,
    format_fewshot_markdown,
    run_fewshot,
    summary_metrics,
    write_fewshot,
)
from omnienc.benchmarks.fewshot_pairs import (
    CATALOGUE,
    EXCLUDED,
    LabelledScan,
    Structure,
    cross_queries,
    in_quick_subset,
    scans_by_key,
)
from omnienc.benchmarks.fewshot_report import (
    bootstrap_mean,
    bootstrap_pairs_mean,
    cells_of,
    summarize,
)
from omnienc.benchmarks.fewshot_scans import halves, read_scan, support_mask, whole
from omnienc.benchmarks.fewshot_setup import DEFAULT_MIN_VOXELS
from omnienc.benchmarks.registration import QUICK_REGISTRATION
from omnienc.data.brats import TUMOUR_REGIONS
from omnienc.data.labeled import read_label_map
from omnienc.data.labelnames import TOTALSEG_CT
from omnienc.errors import CheckpointError, DataError
from omnienc.io import read_volume, write_volume
from omnienc.preprocessing import Preprocessing

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "omnienc-cpu30min"
LIVER, STOMACH = 5, 6


# ------------------------------------------------------------------------------ catalogue


def test_catalogue_pairs_every_ordered_pair_of_two_subjects(volumes: Path):
    scans = scans_by_key()
    sets = cross_queries(CATALOGUE, shots=1)
    by_group: dict[str, int] = {}
    for supports, query in sets:
        assert len(supports) == 1
        group = scans[query].group
        assert scans[supports[0]].group == group
        by_group[group] = by_group.get(group, 0) + 1
        subjects = [scans[k].subject for k in (*supports, query)]
        assert len(set(subjects)) == len(subjects), (supports, query)  # never one subject twice
    assert by_group == {"CT": 2, "BraTS-FLAIR": 12, "BraTS-T1c": 12, "brain lesion": 2}
    for scan in CATALOGUE:  # every catalogued file is there
        assert (volumes / scan.image).exists() and (volumes / scan.labels).is_file(), scan.key
    assert all(scan.modality in ("CT", "MR") and scan.region for scan in CATALOGUE)


def test_k_shot_takes_supports_from_different_scans():
    scans = scans_by_key()
    three = cross_queries(CATALOGUE, shots=3)
    brats = [(s, q) for s, q in three if scans[q].group == "BraTS-FLAIR"]
    assert len(brats) == 4 and all(len(s) == 3 and q not in s for s, q in brats)
    assert all(len(s) == 1 for s, q in three if scans[q].group in ("CT", "brain lesion"))
    two = [(s, q) for s, q in cross_queries(CATALOGUE, shots=2) if scans[q].group == "BraTS-T1c"]
    assert len(two) == 12 and all(len(set(s)) == 2 for s, _ in two)
    with pytest.raises(ValueError, match="shots"):
        cross_queries(CATALOGUE, shots=0)


def test_structures_scored_at_the_default_min_voxels(volumes: Path):
    """13 TotalSegmentator classes in both CTs; every BraTS region in every case; both lesions."""
    counts = {}
    for scan in CATALOGUE:
        if scan.brats_case is None or scan.key.endswith("/flair"):
            labels = read_label_map(volumes / scan.labels).array.astype(np.int64)
            counts[scan.key] = np.bincount(labels.ravel())

    def voxels(key: str, ids: tuple[int, ...]) -> int:
        c = counts[key]
        return int(sum(c[i] for i in ids if i < c.size))

    ct = [
        TOTALSEG_CT[i]
        for i in TOTALSEG_CT
        if min(voxels("ct_sm", (i,)), voxels("ct_dicom", (i,))) >= DEFAULT_MIN_VOXELS
    ]
    assert len(ct) == 13 and {"liver", "spleen", "stomach", "aorta"} <= set(ct)
    for key in (k for k in counts if k.startswith("brats")):
        assert all(voxels(key, ids) >= DEFAULT_MIN_VOXELS for ids in TUMOUR_REGIONS.values())
    lesions = [voxels(f"pyradiomics_{b}", (1,)) for b in ("brain1", "brain2")]
    assert min(lesions) >= DEFAULT_MIN_VOXELS  # brain2's lesion (453 voxels) sets the default


def test_excluded_files_say_why():
    text = " ".join(f"{f} {why}" for f, why in EXCLUDED)
    for name in ("example_ct.nii.gz", "reoriented_anat_moved", "ct-3slice", "example_mr_sm"):
        assert name in text
    assert all(why for _, why in EXCLUDED)


def test_quick_subset():
    scans = scans_by_key()
    kept = [
        (s, q, st.name)
        for s, q in cross_queries(CATALOGUE, 1)
        for st in scans[q].structures
        if in_quick_subset(scans[q].group, s, q, st.name)
    ]
    brats = [k for k in kept if scans[k[1]].group.startswith("BraTS")]
    assert len(brats) == 4 and all(k[2] == "whole_tumour" and "flair" in k[1] for k in brats)
    assert {scans[k[1]].group for k in kept} == {"CT", "BraTS-FLAIR", "brain lesion"}


# ------------------------------------------------------------------------------ report


def test_bootstrap_resamples_queries():
    s = bootstrap_mean([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["n"] == 3
    assert 0.2 <= s["lo"] < 0.4 < s["hi"] <= 0.6
    assert bootstrap_mean([0.2, 0.4, 0.6]) == s  # seeded
    assert bootstrap_mean([0.7]) == {"mean": 0.7, "lo": 0.7, "hi": 0.7, "n": 1}
    assert bootstrap_mean([])["mean"] is None


def test_pair_bootstrap_resamples_scan_pairs_not_queries():
    # Two scan pairs: one with three queries at 0.9, one with one query at 0.1.
    values, pairs = [0.9, 0.9, 0.9, 0.1], ["a", "a", "a", "b"]
    s = bootstrap_pairs_mean(values, pairs, n_boot=4000)
    assert s["mean"] == pytest.approx(0.7) and s["pairs"] == 2
    # A replicate draws {a, a}, {a, b} or {b, b}: means 0.9, 0.7 or 0.1, nothing in between.
    assert s["lo"] == pytest.approx(0.1) and s["hi"] == pytest.approx(0.9)
    # Naive reference: the same replicates computed pair by pair.
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 2, (4000, 2))
    by_pair = {0: [0.9, 0.9, 0.9], 1: [0.1]}
    means = [np.mean([v for k in d for v in by_pair[int(k)]]) for d in draws]
    assert s["lo"] == pytest.approx(np.percentile(means, 2.5), abs=1e-4)
    # Resampling queries instead would give a narrower interval around the same mean.
    assert bootstrap_mean(values, n_boot=4000)["lo"] > s["lo"]
    assert bootstrap_pairs_mean([], [])["mean"] is None


def _row(group: str, structure: str, dice: dict[str, float], source: str | None = None) -> dict:
    return {
        "group": group,
        "source": source or group,
        "structure": structure,
        "dice": dice,
        "supports": ["support"],
        "query": "query",
    }


def test_summary_cells_and_paired_differences():
    rows = [
        _row("CT", "liver", {"head": 0.5, "head_random": 0.0}),
        _row("CT", "spleen", {"head": 0.3, "head_random": 0.1}),
        _row("BraTS-FLAIR", "whole_tumour", {"head": 0.4, "head_random": 0.0}),
        _row("identity", "liver", {"head": 0.9, "head_random": 0.0}, source="CT"),
    ]
    assert cells_of(rows[2]) == ["BraTS-FLAIR whole_tumour"]
    assert cells_of(rows[3]) == ["identity", "identity CT"]
    out = summarize(rows, ["head", "head_random"])
    assert list(out["cells"]) == ["CT", "BraTS-FLAIR whole_tumour", "identity", "identity CT"]
    assert out["cells"]["CT"]["head"]["mean"] == pytest.approx(0.4)
    diff = out["comparisons"]["CT"]["head - head_random"]
    assert diff["mean"] == pytest.approx(0.35) and diff["n"] == 2


# ------------------------------------------------------------------------------ bad inputs


SOURCES = {
    "ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    "ct_dicom": ("example_ct_dicom", "example_seg_dicom.nii.gz"),
}


def _write_crop(
    volumes: Path,
    tmp: Path,
    name: str,
    box: tuple[slice, ...],
    label_shift: float = 0.0,
    source: str = "ct_sm",
    relabel: Callable[[np.ndarray], np.ndarray] | None = None,
) -> LabelledScan:
    """A crop of a TotalSegmentator CT and its labels as NIfTI files in ``tmp/volumes/ct/``.

    ``label_shift`` moves the label map's grid (mm along x); ``relabel`` rewrites the labels
    (written with their own dtype).
    """
    ts = volumes / "totalsegmentator"
    image = read_volume(ts / SOURCES[source][0])
    labels = read_label_map(ts / SOURCES[source][1]).array
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    affine = image.affine @ shift
    (tmp / "volumes" / "ct").mkdir(parents=True, exist_ok=True)
    write_volume(image.array[box], tmp / "volumes" / "ct" / f"{name}.nii.gz", affine=affine)
    label_affine = affine.copy()
    label_affine[0, 3] += label_shift
    out = labels[box].astype(np.uint8) if relabel is None else relabel(labels[box])
    write_volume(out, tmp / "volumes" / "ct" / f"{name}_seg.nii.gz", label_affine, out.dtype)
    return LabelledScan(
        name,
        f"ct/{name}.nii.gz",
        f"ct/{name}_seg.nii.gz",
        "CT",
        "abdomen",
        "CT",
        name,
        (Structure("liver", (LIVER,)), Structure("stomach", (STOMACH,))),
    )


BOX = (slice(20, 80), slice(20, 80), slice(0, 30))


def two_ct_crops(volumes: Path, tmp: Path) -> list[LabelledScan]:
    """The tests' cross-scan pair: a crop of each CT (liver and stomach in both)."""
    a = _write_crop(volumes, tmp, "a", (slice(25, 65), slice(35, 75), slice(8, 28)))
    box = (slice(200, 320), slice(200, 320), slice(0, 20))
    return [a, _write_crop(volumes, tmp, "b", box, source="ct_dicom")]


def test_label_map_on_another_grid_is_an_error_naming_it(volumes: Path, tmp_path: Path):
    scan = _write_crop(volumes, tmp_path, "shifted", BOX, label_shift=6.0)
    with pytest.raises(DataError, match=r"shifted_seg\.nii\.gz.*affine differs"):
        read_scan(scan, tmp_path / "volumes", Preprocessing())


def test_float_labels_with_fractions_are_an_error_naming_the_file(volumes: Path, tmp_path: Path):
    scan = _write_crop(volumes, tmp_path, "frac", BOX, relabel=lambda a: a.astype(np.float32) + 0.5)
    with pytest.raises(DataError, match=r"frac_seg\.nii\.gz.*non-integer"):
        read_scan(scan, tmp_path / "volumes", Preprocessing())


def test_empty_and_vanishing_support_masks_name_the_label_file(volumes: Path, tmp_path: Path):

    def relabel(labels: np.ndarray) -> np.ndarray:
        one = np.zeros(labels.shape, np.uint8)
        one[1, 1, 1] = 7  # one 3 mm voxel: gone on an 8 mm grid
        one[20:40, 20:40, 10:20] = LIVER
        return one

    scan = _write_crop(volumes, tmp_path, "small", BOX, relabel=relabel)
    prepared = read_scan(scan, tmp_path / "volumes", Preprocessing(spacing=(8.0, 8.0, 8.0)))
    assert support_mask(whole(prepared), Structure("liver", (LIVER,))).any()
    with pytest.raises(DataError, match=r"small_seg\.nii\.gz: support mask is empty.*99"):
        support_mask(whole(prepared), Structure("absent", (99,)))
    assert not prepared.pre_mask(Structure("tiny", (7,))).any()
    with pytest.raises(DataError, match=r"small_seg\.nii\.gz.*vanished when resampled"):
        support_mask(whole(prepared), Structure("tiny", (7,)))


def test_unknown_encoder_or_method_is_refused(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no-such-checkpoint"):
        run_fewshot(str(tmp_path / "no-such-checkpoint"), None, progress=False)
    with pytest.raises(ValueError, match="unknown encoder"):
        run_fewshot("random:no_such_arch", None, progress=False)
    with pytest.raises(ValueError, match="unknown few-shot methods"):
        run_fewshot("random:resconv_tiny", None, methods=["head", "magic"], progress=False)


def test_halves_cut_the_structure_and_partition_the_native_grid(volumes: Path, tmp_path: Path):
    scan = _write_crop(volumes, tmp_path, "cut", BOX)
    prepared = read_scan(scan, tmp_path / "volumes", Preprocessing())
    liver = scan.structures[0]
    lower, upper = halves(prepared, liver)
    assert lower.pre_mask(liver).any() and upper.pre_mask(liver).any()
    lo, up = lower.native_region, upper.native_region
    assert lo is not None and up is not None
    assert not (lo & up).any() and (lo | up).all()
    both = lower.truth(liver).sum() + upper.truth(liver).sum()
    assert both == prepared.voxels(liver)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_data(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A data root holding a crop of each CT (liver, stomach), and their catalogue."""
    tmp = tmp_path_factory.mktemp("fewshot")
    return tmp, two_ct_crops(volumes, tmp)


@pytest.fixture(scope="module")
def tiny_payload(tiny_data: tuple[Path, list]) -> dict:
    """run_fewshot on the two crops with the shipped checkpoint."""
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    root, catalogue = tiny_data
    return run_fewshot(
        str(CHECKPOINT),
        root,
        catalogue=catalogue,
        min_voxels=200,
        registration=QUICK_REGISTRATION,
        progress=False,
    )


def test_random_spec_runs_what_needs_no_head(tiny_data: tuple[Path, list]):
    root, catalogue = tiny_data
    payload = run_fewshot(
        "random:resconv_tiny:3",
        root,
        catalogue=catalogue,
        min_voxels=200,
        methods=["head", "prototype_random", "intensity"],
        progress=False,
    )
    assert payload["methods"] == ["prototype_random", "intensity"]
    assert "no in-context head" in payload["skipped_methods"]["head"]
    assert payload["encoder"]["checkpoint"] == "random:resconv_tiny:3"
    assert payload["floor"] is None and payload["checkpoint_files"] == {}
    # Preprocessing() resamples to 2 mm: the 192 mm default window is 96 voxels.
    assert payload["settings"]["crop_size"] == [96, 96, 96]
    assert payload["settings"]["spacing"] == [2.0, 2.0, 2.0]
    assert "Not run: head" in format_fewshot_markdown(payload)
    assert all(set(r["dice"]) == {"prototype_random", "intensity"} for r in payload["rows"])


def test_tiny_run_payload(tiny_payload: dict):
    p = tiny_payload
    assert p["methods"] == list(METHODS) and not p["skipped_methods"]
    groups = [r["group"] for r in p["rows"]]
    assert groups.count("CT") >= 2 and "identity" in groups
    for row in p["rows"]:
        assert all(0.0 <= d <= 1.0 for d in row["dice"].values())
        after_registration = {"registration", "head_atlas", "prototype_atlas"}
        expected = set(METHODS) - (after_registration if row["group"] != "CT" else set())
        assert set(row["dice"]) == expected, row["group"]
        if row["group"] == "CT":  # the atlas diagnostics only take voxels away
            for m in ("head", "prototype"):
                full, kept = row["scores"][m], row["scores"][f"{m}_atlas"]
                assert kept["pred_voxels"] <= full["pred_voxels"]
                far_voxels = [(s["far"] or 0.0) * s["pred_voxels"] for s in (kept, full)]
                assert far_voxels[0] <= far_voxels[1] + 0.5
        assert row["query_voxels"] >= (200 if row["group"] != "intra-scan" else 100)
    assert "CT" in p["summary"]["cells"] and "identity CT" in p["summary"]["cells"]
    assert set(p["seconds_per_query"]) == set(METHODS)
    assert set(p["checkpoint_files"]) >= {"config.json", "model.safetensors"}
    assert set(p["data_files"]) == {
        "ct/a.nii.gz",
        "ct/a_seg.nii.gz",
        "ct/b.nii.gz",
        "ct/b_seg.nii.gz",
    }
    assert all(len(v) == 64 for v in p["data_files"].values())
    assert p["floor"].startswith("random:resconv_small")
    assert {"cpu", "torch_threads", "date"} <= set(p["machine"])
    metrics = summary_metrics(p)
    assert "fewshot/head/ct" in metrics and "fewshot/head_random/cross_scan" in metrics
    assert metrics["fewshot/head/cross_scan"] == pytest.approx(metrics["fewshot/head/ct"])


def test_tiny_run_markdown_and_files(tiny_payload: dict, tmp_path: Path):
    payload = {**tiny_payload, "command": "python -m omnienc.benchmarks.fewshot --quick"}
    text = format_fewshot_markdown(payload)
    assert "`python -m omnienc.benchmarks.fewshot --quick`" in text
    assert "| CT |" in text and "head (pretrained)" in text and "Left out:" in text
    json_path, md_path = write_fewshot(payload, tmp_path / "out" / "fewshot")
    assert json.loads(json_path.read_text())["rows"] == payload["rows"]
    assert md_path.read_text() == text


def test_arguments():
    parser = argparse.ArgumentParser()
    add_fewshot_arguments(parser)
    args = parser.parse_args(["--encoder", "random:resconv_tiny", "--shots", "3", "--quick", "-q"])
    assert (args.encoder, args.shots, args.quick, args.quiet) == (
        "random:resconv_tiny",
        3,
        True,
        True,
    )
    assert args.min_voxels == DEFAULT_MIN_VOXELS and args.methods is None
    args = parser.parse_args(["--methods", "head", "registration", "--min-voxels", "50"])
    assert args.methods == ["head", "registration"] and args.min_voxels == 50


@pytest.mark.slow
def test_two_shot_run_averages_supports(volumes: Path, tmp_path: Path):
    """k supports per query: every method combines them (a third crop stands in for a scan)."""
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    a = _write_crop(volumes, tmp_path, "a", (slice(25, 65), slice(35, 75), slice(8, 28)))
    c = _write_crop(volumes, tmp_path, "c", (slice(35, 75), slice(30, 70), slice(5, 25)))
    box = (slice(200, 320), slice(200, 320), slice(0, 20))
    b = _write_crop(volumes, tmp_path, "b", box, source="ct_dicom")
    payload = run_fewshot(
        str(CHECKPOINT),
        tmp_path,
        shots=2,
        catalogue=[a, b, c],
        min_voxels=200,
        registration=QUICK_REGISTRATION,
        progress=False,
    )
    cross = [r for r in payload["rows"] if r["group"] == "CT"]
    assert cross and all(r["shots"] == 2 and len(r["support_voxels"]) == 2 for r in cross)
    assert all(set(r["dice"]) == set(METHODS) for r in cross)
    assert payload["settings"]["shots"] == 2


def test_crop_size_sets_the_reference_crop_and_windows(tiny_data: tuple[Path, list], capsys):
    """--crop-size replaces the default 192 mm window (96 at 2 mm); bad sizes are refused."""
    from omnienc.benchmarks.fewshot import crop_size_arg, main

    if not CHECKPOINT.is_dir():
        pytest.skip(f"no shipped checkpoint at {CHECKPOINT}")
    root, catalogue = tiny_data
    kwargs = {"catalogue": catalogue, "min_voxels": 200, "methods": ["head"], "progress": False}
    p = run_fewshot(str(CHECKPOINT), root, crop_size=(16, 16, 24), **kwargs)
    assert p["settings"]["crop_size"] == [16, 16, 24]
    assert "reference crop and windows [16, 16, 24]" in format_fewshot_markdown(p)
    default = run_fewshot(str(CHECKPOINT), root, **kwargs)
    assert default["settings"]["crop_size"] == [96, 96, 96]
    assert [r["dice"]["head"] for r in p["rows"]] != [r["dice"]["head"] for r in default["rows"]]
    with pytest.raises(ValueError, match="three positive ints"):
        run_fewshot(str(CHECKPOINT), root, crop_size=(16, 0, 16), **kwargs)
    parser = argparse.ArgumentParser()
    add_fewshot_arguments(parser)
    assert crop_size_arg(parser, parser.parse_args(["--crop-size", "48"]).crop_size) == (48,) * 3
    assert crop_size_arg(parser, None) is None
    for bad in (["16", "16"], ["0"]):
        with pytest.raises(SystemExit):
            main(["--crop-size", *bad, "--out", "unused"])
        assert "--crop-size takes one or three positive ints" in capsys.readouterr().err
