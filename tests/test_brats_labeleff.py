"""BraTS label efficiency: rotations, the region classes, native-grid scoring, the payload and
Markdown, the inputs it must refuse, and a tiny end-to-end run on the real cases."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from omnienc.benchmarks.brats_labeleff import (
    METHODS,
    QUICK_METHODS,
    main,
    run_brats_label_efficiency,
    summarize,
)
from omnienc.benchmarks.brats_labeleff_cases import (
    case_bootstrap,
    dice,
    label_rotations,
    native_dice,
    prepare_case,
    regions_of_classes,
    to_native,
    tumour_classes,
)
from omnienc.benchmarks.brats_labeleff_report import (
    format_brats_label_efficiency_markdown,
    metric_key,
    summary_metrics,
)
from omnienc.data.brats import LABEL_FILE, SEQUENCES, find_brats_cases, tumour_region
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "omnienc-cpu30min"
NAMES = ["a", "b", "c", "d"]


def _case_root(tmp: Path, data_root: Path, names: list[str], labels: dict | None = None) -> Path:
    """A data root holding some real cases by symlink; ``labels`` replaces a case's label map."""
    src = data_root / "volumes" / "brats"
    for name in names:
        folder = tmp / "volumes" / "brats" / name
        folder.mkdir(parents=True)
        for f in [*SEQUENCES.values(), LABEL_FILE]:
            if f == LABEL_FILE and labels and name in labels:
                nib.save(labels[name], folder / f)
            else:
                os.symlink(src / name / f, folder / f)
    return tmp


@pytest.fixture(scope="module")
def real_names(data_root: Path) -> list[str]:
    return [c.name for c in find_brats_cases(data_root)]


@pytest.mark.parametrize("n_train", [1, 2, 3])
@pytest.mark.parametrize("n_rot", [1, 2, 4, 10])
def test_rotations_never_put_a_test_case_in_its_training_set(n_train: int, n_rot: int):
    rots = label_rotations(NAMES, n_train, n_rot, seed=3)
    assert len(rots) == min(n_rot, len(list(itertools.combinations(NAMES, n_train))))
    assert len({r.train for r in rots}) == len(rots)  # distinct training sets
    for i, r in enumerate(rots):
        assert r.index == i and r.n_train == n_train and len(r.train) == n_train
        assert not set(r.train) & set(r.test)
        assert sorted([*r.train, *r.test]) == NAMES
    assert rots == label_rotations(NAMES, n_train, n_rot, seed=3)  # seeded


def test_rotations_test_every_case_early(real_names: list[str]):
    assert len(real_names) == 4
    halves = label_rotations(real_names, 2, 2)
    assert set(halves[0].train) == set(halves[1].test)  # the second is the complement
    for n in (1, 2):
        tested = {c for r in label_rotations(real_names, n, 2) for c in r.test}
        assert tested == set(real_names)
    orders = {tuple(r.train for r in label_rotations(NAMES, 1, 4, seed=s)) for s in range(6)}
    assert len(orders) > 1  # the seed matters


@pytest.mark.parametrize(
    ("args", "match"), [((0, 1), "n_train"), ((4, 1), "n_train"), ((1, 0), "n_rotations")]
)
def test_rotations_refuse_bad_counts(args: tuple[int, int], match: str):
    with pytest.raises(ValueError, match=match):
        label_rotations(NAMES, *args)
    with pytest.raises(ValueError, match="distinct"):
        label_rotations(["a", "a", "b"], 1, 1)


def test_classes_and_regions_on_the_real_labels(data_root: Path):
    assert tumour_classes(np.arange(5)).tolist() == [0, 2, 1, 2, 2]
    case = find_brats_cases(data_root)[0]
    labels = case.read_labels()
    classes = tumour_classes(labels)
    assert set(np.unique(classes)) == {0, 1, 2}
    regions = regions_of_classes(classes)
    for region in ("whole_tumour", "tumour_core"):
        np.testing.assert_array_equal(regions[region], tumour_region(labels, region))
    np.testing.assert_array_equal(classes == 1, labels == 2)  # oedema: WT outside the core
    assert not (regions["tumour_core"] & ~regions["whole_tumour"]).any()


def test_dice_and_case_bootstrap():
    a = np.array([1, 1, 0, 0], bool)
    assert dice(a, a) == 1.0
    assert dice(a, np.array([1, 0, 0, 0], bool)) == pytest.approx(2 / 3)
    assert dice(a, np.zeros(4, bool)) is None  # absent region: not scored
    assert case_bootstrap({"x": [0.5], "y": [0.7]}) is None  # too few cases
    lo, hi = case_bootstrap({"x": [0.2, 0.4], "y": [0.5], "z": [0.9]}) or (0, 0)
    assert 0.3 <= lo <= 0.55 <= hi <= 0.9


def test_native_grid_round_trip_keeps_the_tumour(data_root: Path):
    """The true classes, preprocessed to 2 mm and mapped back, match the native labels."""
    case = prepare_case(find_brats_cases(data_root)[1], Preprocessing())
    assert case.native_classes.shape == (240, 240, 155)
    assert case.item.image.shape[0] == 1 and max(case.item.image.shape[1:]) < 120
    one_hot = torch.nn.functional.one_hot(case.item.label[0], 3).permute(3, 0, 1, 2).float()
    scores = native_dice(to_native(one_hot, case), case)
    assert scores["whole_tumour"] > 0.85 and scores["tumour_core"] > 0.8
    assert set(case.files) == {f"{case.name}/{SEQUENCES['flair']}", f"{case.name}/{LABEL_FILE}"}


def test_summary_spread_and_interval():
    def run(rot: int, values: dict[str, float]) -> dict:
        dice = {c: {"whole_tumour": v, "tumour_core": None} for c, v in values.items()}
        return {"method": "frozen", "n_train": 1, "rotation": rot, "dice": dice}

    runs = [run(0, {"b": 0.2, "c": 0.4, "d": 0.6}), run(1, {"a": 0.8, "c": 0.6, "d": 0.4})]
    cell = summarize(runs)["frozen"]["1"]
    wt = cell["whole_tumour"]
    assert wt["rotation_means"] == pytest.approx([0.4, 0.6])
    assert wt["mean"] == pytest.approx(0.5) and wt["sd"] == pytest.approx(
        np.std([0.4, 0.6], ddof=1)
    )
    assert wt["n_test_cases"] == 4 and wt["ci"] is not None
    assert cell["tumour_core"] is None  # absent everywhere
    assert metric_key("whole_tumour", 1) == "brats_wt_dice_1case"
    assert metric_key("tumour_core", "3") == "brats_tc_dice_3cases"


def _bad_labels(data_root: Path, name: str, edit) -> nib.Nifti1Image:
    img = nib.nifti1.load(data_root / "volumes" / "brats" / name / LABEL_FILE)
    arr, affine = edit(np.asarray(img.dataobj, dtype=np.float32).copy(), img.affine.copy())
    return nib.Nifti1Image(arr.astype(np.uint8), affine)  # uint8: quick to write and read


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a, aff: (a[:, :, :150], aff), "grid"),  # label grid differs from the image
        (lambda a, aff: (np.where(a == 4, 5.0, a), aff), "0..4"),  # label outside 0..4
    ],
    ids=["grid", "range"],
)
def test_bad_labels_are_data_errors_naming_the_file(
    tmp_path: Path, data_root: Path, real_names: list[str], edit, match: str, capsys
):
    bad = real_names[0]  # read first: the error comes before any other case is read
    root = _case_root(tmp_path, data_root, real_names[:2], {bad: _bad_labels(data_root, bad, edit)})
    with pytest.raises(DataError, match=match) as err:
        run_brats_label_efficiency("random:resconv_tiny", root, quick=True, progress=False)
    assert err.value.path == root / "volumes" / "brats" / bad / LABEL_FILE
    code = main(
        [
            "--encoder",
            "random:resconv_tiny",
            "--data",
            str(root),
            "-q",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and f"{bad}/{LABEL_FILE}" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_fewer_than_two_cases_is_a_data_error(
    tmp_path: Path, data_root: Path, real_names: list[str]
):
    root = _case_root(tmp_path, data_root, real_names[:1])
    with pytest.raises(DataError, match="at least 2") as err:
        run_brats_label_efficiency("random:resconv_tiny", root, progress=False)
    assert err.value.path == root / "volumes" / "brats"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BraTS case"):
        run_brats_label_efficiency("random:resconv_tiny", tmp_path / "empty", progress=False)


def test_unknown_method_is_refused(capsys):
    with pytest.raises(ValueError, match="unknown methods"):
        run_brats_label_efficiency("random:resconv_tiny", None, methods=["linear"])
    with pytest.raises(SystemExit):
        main(["--methods", "linear"])
    assert "invalid choice" in capsys.readouterr().err


def _check_payload(payload: dict, methods: tuple[str, ...], names: list[str]) -> None:
    assert payload["methods"] == list(methods)
    assert payload["sequence"] == "flair" and payload["dice_grid"].startswith("native")
    assert payload["encoder"]["checkpoint"].startswith("sha256:")
    assert {c["name"] for c in payload["cases"]} == set(names)
    for c in payload["cases"]:
        assert all(len(h) == 64 for h in c["files"].values()) and len(c["files"]) == 2
    assert payload["machine"]["cpu"] and payload["seconds"]["total"] > 0
    assert payload["command"].startswith("python -m omnienc.benchmarks.brats_labeleff")
    for run in payload["runs"]:
        assert not set(run["train"]) & set(run["test"]) and set(run["dice"]) == set(run["test"])
        for scores in run["dice"].values():
            assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    assert {(r["method"], r["rotation"]) for r in payload["runs"]} == {
        (m, i) for m in methods for i in range(len(payload["rotations"]))
    }
    text = format_brats_label_efficiency_markdown(payload)
    assert payload["command"] in text and "FLAIR only" in text and "native 1 mm grid" in text
    assert "## Whole tumour" in text and "## Tumour core" in text
    assert text.count("| random-init, frozen + decoder (floor) |") == 2
    metrics = summary_metrics(payload)
    assert set(metrics) == {
        "brats_wt_dice_1case",
        "brats_tc_dice_1case",
        "brats_wt_dice_1case_floor",
        "brats_tc_dice_1case_floor",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_tiny_quick_run_with_the_checkpoint(tmp_path: Path, data_root: Path, real_names: list):
    """Two real cases, 2 steps: the CLI writes the JSON and the Markdown."""
    root = _case_root(tmp_path / "data", data_root, real_names[:2])
    out = tmp_path / "res" / "brats_labeleff"
    argv = ["--encoder", str(CKPT), "--quick", "--steps", "2", "--data", str(root), "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["quick"] and payload["plan"]["steps"] == 2
    assert [r["n_train"] for r in payload["rotations"]] == [1]  # 3 cases need 4 cases
    assert payload["command"].endswith(" ".join([*argv, "--out", str(out)]))
    _check_payload(payload, QUICK_METHODS, real_names[:2])
    assert out.with_suffix(".md").read_text() == format_brats_label_efficiency_markdown(payload)


@pytest.mark.slow
def test_all_four_methods_end_to_end(tmp_path: Path, data_root: Path, real_names: list):
    root = _case_root(tmp_path, data_root, real_names[:2])
    payload = run_brats_label_efficiency(str(CKPT), root, steps=2, progress=False, seed=1)
    assert [(r["n_train"], r["index"]) for r in payload["rotations"]] == [(1, 0), (1, 1)]
    _check_payload(payload, METHODS, real_names[:2])
    assert "seed 1" in payload["floor"] and "--seed 1" in payload["command"]
