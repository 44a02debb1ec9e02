"""Latent maps: structure crops, gathering mixed inputs, metrics, PNG/CSV/HTML, ``omnienc umap``.

The HTML page is opened in headless Chromium (Debian's ``chromium``); without it those tests
skip, unless ``OMNIENC_REQUIRE_CHROMIUM=1`` (CI), where they fail.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from omnienc.adapters.latent import (
    MISSING,
    LatentOptions,
    LatentSet,
    centred,
    check_inputs,
    colouring_metrics,
    gather_latent,
    latent_metrics,
    palette,
    parse_structures_spec,
    render_html,
    render_png,
    structure_crops,
    structure_group,
    trustworthiness_k,
    umap_layout,
    write_csv,
    write_html,
)
from omnienc.cli import main
from omnienc.data.labelnames import TOTALSEG_CT, TOTALSEG_MR
from omnienc.encoders import random_encoder
from omnienc.errors import DataError, PathError
from omnienc.preprocessing import Preprocessing

TS = "totalsegmentator"


# ---------------------------------------------------------------- structure crops


def _synthetic_pair(tmp_path: Path, cubes: dict[int, tuple[slice, slice, slice]]) -> tuple:
    """A 2 mm CT (-1000 HU, +1000 HU inside the cubes) and its label map, RAS, shape 40^3."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.full((40, 40, 40), -1000, np.int16)
    labels = np.zeros((40, 40, 40), np.uint8)
    for k, box in cubes.items():
        image[box] = 1000
        labels[box] = k
    img_path, lab_path = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(labels, affine), lab_path)
    return img_path, lab_path


def test_structure_crop_is_centred_on_the_structure(tmp_path: Path):
    # Liver (id 5) as a 4^3 cube at 10..13: centroid 11.5 -> voxel 12 (round half to even).
    img, lab = _synthetic_pair(tmp_path, {5: (slice(10, 14), slice(20, 24), slice(4, 8))})
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0))
    crops, modality = structure_crops(img, lab, pre, crop_size=(8, 8, 8), min_voxels=10)
    assert modality == "CT"  # the file name token
    (crop,) = crops
    assert crop.name == "liver" and crop.structure_id == 5 and crop.voxels == 64
    assert crop.centre == (12, 22, 6)
    assert crop.image.shape == (1, 8, 8, 8) and crop.image.dtype == np.float32
    # CT is scaled to [0, 1]: the cube is 1, the rest 0; the crop [c-4, c+4) holds all of it.
    assert crop.image.sum() == pytest.approx(64.0)
    assert crop.image[0, 2:6, 2:6, 2:6].min() == pytest.approx(1.0)


def test_structure_crop_at_the_border_is_padded_with_the_image_minimum(tmp_path: Path):
    img, lab = _synthetic_pair(
        tmp_path,
        {
            1: (slice(0, 4), slice(0, 4), slice(0, 4)),
            2: (slice(30, 31), slice(30, 31), slice(0, 1)),
        },
    )
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0))
    crops, _ = structure_crops(img, lab, pre, crop_size=(16, 16, 16), min_voxels=8)
    (crop,) = crops  # label 2 has 1 voxel < min_voxels
    assert crop.name == "spleen" and crop.centre == (2, 2, 2)
    # [c-8, c+8) = [-6, 10): six padded planes per axis, at the image minimum (0 after scaling).
    assert crop.image[0, :6].max() == 0.0 and crop.image[0, :, :6].max() == 0.0
    assert crop.image.sum() == pytest.approx(64.0)


def test_structure_crops_name_override_and_errors(tmp_path: Path):
    img, lab = _synthetic_pair(tmp_path, {1: (slice(5, 10), slice(5, 10), slice(5, 10))})
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0))
    crops, _ = structure_crops(img, lab, pre, (8, 8, 8), min_voxels=1, names="pulmonary_artery")
    assert [c.name for c in crops] == ["pulmonary_artery"]
    crops, _ = structure_crops(img, lab, pre, (8, 8, 8), min_voxels=1, names={})
    assert [c.name for c in crops] == ["label 1"]
    crops, _ = structure_crops(img, lab, pre, (8, 8, 8), min_voxels=1)
    assert [c.name for c in crops] == ["spleen"]  # TotalSegmentator's class 1
    with pytest.raises(DataError, match="no structure has 1000 or more voxels") as info:
        structure_crops(img, lab, pre, (8, 8, 8), min_voxels=1000)
    assert info.value.path == lab
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 30), np.uint8), np.diag([2.0, 2, 2, 1])), other)
    with pytest.raises(DataError, match="differs from its image") as info:
        structure_crops(img, other, pre)
    assert info.value.path == other
    with pytest.raises(ValueError, match="crop_size"):
        structure_crops(img, lab, pre, (8, 8))


def test_structure_crops_of_the_real_mr_pair(volumes: Path):
    crops, modality = structure_crops(
        volumes / TS / "example_mr_sm.nii.gz",
        volumes / TS / "example_seg_mr.nii.gz",
        Preprocessing(),
    )
    assert modality == "MR"
    names = {c.name for c in crops}
    assert {"liver", "spleen", "kidney_left", "vertebrae", "aorta"} <= names  # total_mr names
    assert len(crops) >= 15
    assert all(c.image.shape == (1, 32, 32, 32) for c in crops)
    assert all(np.isfinite(c.image).all() and c.image.std() > 0 for c in crops)


def test_every_totalsegmentator_structure_has_an_organ_group():
    names = set(TOTALSEG_CT.values()) | set(TOTALSEG_MR.values())
    assert [n for n in sorted(names) if structure_group(n) == "other"] == []
    assert structure_group("vertebrae_L3") == "spine"
    assert structure_group("rib_left_7") == "rib cage"
    assert structure_group("pulmonary_artery") == "vessel"
    assert structure_group("something_else") == "other"


# ---------------------------------------------------------------- input specs


def test_parse_structures_spec():
    assert parse_structures_spec("structures:a.nii.gz:b.nii.gz") == (
        Path("a.nii.gz"),
        Path("b.nii.gz"),
        None,
    )
    assert parse_structures_spec("structures:a:b:pulmonary_artery")[2] == "pulmonary_artery"
    for bad in ("structures:a", "structures:a:b:c:d", "structures::b", "structure:a:b"):
        with pytest.raises(ValueError, match="bad structures spec"):
            parse_structures_spec(bad)


def test_check_inputs_names_the_missing_file(tmp_path: Path, volumes: Path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(PathError) as info:
        check_inputs(
            [str(volumes / TS), f"structures:{volumes / TS / 'example_ct_sm.nii.gz'}:{missing}"],
            None,
        )
    assert info.value.path == missing and "no such file" in info.value.problem
    with pytest.raises(ValueError, match="MedMNIST folder"):
        check_inputs(["medmnist:breastmnist:28:test"], None)
    with pytest.raises(PathError, match="pass --download") as info:
        check_inputs(["medmnist:organmnist3d:64:test"], tmp_path)
    assert info.value.path == tmp_path / "organmnist3d_64.npz"
    check_inputs(["medmnist:organmnist3d:64:test"], tmp_path, download=True)  # fetched later
    with pytest.raises(ValueError, match="bad MedMNIST spec"):
        check_inputs(["medmnist:breastmnist:28"], tmp_path)
    with pytest.raises(ValueError, match="at least one input"):
        check_inputs([], None)


def test_gather_latent_mixes_volumes_crops_and_medmnist(volumes: Path, data_root: Path):
    ts = volumes / TS
    encoder = random_encoder("resconv_tiny", 0)
    inputs = [
        str(ts / "example_mr_sm.nii.gz"),
        f"structures:{ts / 'example_mr_sm.nii.gz'}:{ts / 'example_seg_mr.nii.gz'}",
        "medmnist:breastmnist:28:test",
    ]
    latent = gather_latent(
        encoder,
        Preprocessing(),
        inputs,
        checkpoint="random:resconv_tiny:0",
        medmnist_root=data_root / "medmnist",
        options=LatentOptions(max_per_input=12, seed=3),
        progress=False,
    )
    per_input = Counter(latent.inputs)
    assert per_input[inputs[0]] == 1 and per_input[inputs[1]] == 12 and per_input[inputs[2]] == 12
    assert latent.features.shape == (25, encoder.embed_dim)
    assert np.isfinite(latent.features).all()
    assert latent.modality[0] == "MR" and latent.label[0] == MISSING
    assert latent.dataset[0] == TS and latent.sources[0] == str(ts / "example_mr_sm.nii.gz")
    crops = slice(1, 13)
    assert set(latent.modality[crops]) == {"MR"}
    assert set(latent.dataset[crops]) == {"crops of example_mr_sm"}
    assert all(g != "other" and g != MISSING for g in latent.group[crops])
    assert all(i.startswith(str(ts / "example_mr_sm.nii.gz") + "#") for i in latent.ids[crops])
    breast = slice(13, 25)
    assert set(latent.modality[breast]) == {"US"}
    assert set(latent.label[breast]) <= {"breastmnist: malignant", "breastmnist: normal, benign"}
    assert latent.sources[13].endswith("breastmnist.npz")
    # The subset is seeded: the same rows again, other rows with another seed.
    again = gather_latent(
        encoder,
        Preprocessing(),
        inputs[2:],
        checkpoint="random:resconv_tiny:0",
        medmnist_root=data_root / "medmnist",
        options=LatentOptions(max_per_input=12, seed=3),
        progress=False,
    )
    assert again.ids == latent.ids[breast]
    np.testing.assert_allclose(again.features, latent.features[breast], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- metrics


def _clusters(n_per: int = 20, sep: float = 6.0, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * sep
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(["a", "b", "c"], n_per)
    return x.astype(np.float32), y


def _naive_cosine_silhouette(x: np.ndarray, y: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    scores = []
    for i in range(len(x)):
        same = (y == y[i]) & (np.arange(len(x)) != i)
        a = d[i, same].mean()
        b = min(d[i, y == c].mean() for c in set(y) if c != y[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_colouring_metrics_match_naive_references():
    x, y = _clusters(sep=0.7, seed=1)  # overlapping clusters: neither metric is trivial
    coords = x[:, :2]
    m = colouring_metrics("c", x, coords, list(y), seed=4, k=1)
    xc = centred(x)
    assert m.silhouette_features == pytest.approx(_naive_cosine_silhouette(xc, y), abs=1e-6)
    # 1-NN by cosine similarity on the same stratified folds.
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=4)
    u = xc / np.linalg.norm(xc, axis=1, keepdims=True)
    pred = np.empty(len(y), dtype=object)
    for train, test in folds.split(xc, y):
        pred[test] = y[train][np.argmax(u[test] @ u[train].T, axis=1)]
    assert m.knn_accuracy == pytest.approx(float(np.mean(pred == y)))
    assert 0.3 < m.knn_accuracy < 1.0
    assert m.folds == 5 and m.k == 1 and m.majority == pytest.approx(1 / 3)


def test_colouring_metrics_separate_clusters_from_noise():
    x, y = _clusters(sep=6.0)
    good = colouring_metrics("clusters", x, x[:, :2], list(y))
    assert good.knn_accuracy == 1.0 and good.silhouette_features > 0.5
    shuffled = np.random.default_rng(0).permutation(y)
    bad = colouring_metrics("noise", x, x[:, :2], list(shuffled))
    assert bad.knn_accuracy < 0.6 and abs(bad.silhouette_features) < 0.1


def test_colouring_metrics_leave_out_missing_values_and_singletons():
    x, y = _clusters(n_per=4)
    values = list(y)
    values[0] = MISSING
    values[1] = "lonely"
    m = colouring_metrics("c", x, None, values)
    assert m.left_out == 2 and m.n == 10
    assert m.classes == {"a": 2, "b": 4, "c": 4}
    assert m.folds == 2  # capped by the smallest class
    assert m.silhouette_2d is None and m.knn_accuracy is not None
    none = colouring_metrics("c", x, None, ["a"] + ["lonely" + str(i) for i in range(11)])
    assert none.knn_accuracy is None and none.silhouette_features is None
    assert "fewer than two classes" in none.note


def _latent(n_per: int = 10) -> tuple[LatentSet, np.ndarray]:
    x, y = _clusters(n_per=n_per)
    n = len(x)
    third = n // 3
    latent = LatentSet(
        features=x,
        ids=[f"id-{i}" for i in range(n)],
        sources=[f"/data/file_{i}.nii.gz" for i in range(n)],
        inputs=["in"] * n,
        modality=["CT"] * third + ["MR"] * third + ["unknown"] * (n - 2 * third),
        dataset=["d1"] * (2 * third) + ["d2"] * (n - 2 * third),
        label=[str(v) for v in y[: 2 * third]] + [MISSING] * (n - 2 * third),
        group=["g"] * third + ["h"] * third + [MISSING] * (n - 2 * third),
    )
    return latent, x[:, :2].copy()


def test_latent_metrics_rows_and_trustworthiness():
    latent, coords = _latent()
    m = latent_metrics(latent, coords)
    names = [c.colouring for c in m.colourings]
    assert names == ["modality", "dataset", "label", "group", "label within d1", "group within d1"]
    assert m.colourings[0].left_out == 10  # "unknown" modality
    assert m.trustworthiness_k == 10
    scrambled = np.random.default_rng(0).permutation(coords)
    assert latent_metrics(latent, scrambled).trustworthiness < m.trustworthiness
    assert [trustworthiness_k(n) for n in (4, 5, 21, 22, 1000)] == [1, 2, 10, 10, 10]
    json.dumps(m.to_dict(), allow_nan=False)


def test_umap_needs_four_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        umap_layout(np.zeros((3, 8)))


@pytest.mark.slow
def test_umap_layout_is_seeded():
    x, y = _clusters(n_per=15)
    a = umap_layout(x, seed=0)
    b = umap_layout(x, seed=0)
    assert a.shape == (45, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert colouring_metrics("c", x, a, list(y)).silhouette_2d > 0.5
    assert umap_layout(x[:5], seed=1).shape == (5, 2)


# ---------------------------------------------------------------- PNG and CSV


def test_png_has_one_panel_per_colouring(tmp_path: Path):
    from matplotlib.image import imread

    latent, coords = _latent()
    data = render_png(latent, coords, "test map", latent_metrics(latent, coords))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "map.png"
    path.write_bytes(data)
    assert imread(path).shape[:2] == (1100, 1500)


def test_palette_is_stable_and_greys_missing_values():
    a = palette(["MR", "CT", MISSING, "unknown"])
    b = palette(["CT", "MR"])
    assert a["CT"] == b["CT"] and a["MR"] == b["MR"] and a["CT"] != a["MR"]
    assert a[MISSING] == a["unknown"] == "#b0b0b0"
    many = palette([f"c{i}" for i in range(50)])
    assert len(set(many.values())) == 50


def test_csv_round_trip(tmp_path: Path):
    latent, coords = _latent()
    path = write_csv(tmp_path / "map.csv", latent, coords)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == [
        "id",
        "x",
        "y",
        "modality",
        "dataset",
        "label",
        "group",
        "input",
        "source",
    ]
    assert [r["id"] for r in rows] == latent.ids
    got = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    np.testing.assert_allclose(got, coords, rtol=1e-5)
    assert rows[-1]["label"] == MISSING and rows[0]["source"] == "/data/file_0.nii.gz"


# ---------------------------------------------------------------- HTML in Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("OMNIENC_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (OMNIENC_REQUIRE_CHROMIUM=1) but not on PATH")
        pytest.skip("chromium not installed (apt-get install chromium); the HTML is not checked")
    return exe


def open_in_chromium(html_path: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """Load a page in headless Chromium; return its DOM after scripts and every problem seen.

    Problems: errors the page's guard recorded (uncaught errors, rejections, console.error), a
    missing ``data-rendered`` marker, and any console message Chromium logged (the page logs
    nothing when it works).
    """
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            html_path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    problems = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    match = re.search(r"<html[^>]*>", dom)
    assert match, dom[:500]
    tag = match.group(0)
    errors = re.search(r'data-errors="([^"]*)"', tag)
    if errors:
        problems.append("page recorded: " + errors.group(1))
    if "data-rendered=" not in tag:
        problems.append("the page never set data-rendered")
    return dom, problems


def test_html_renders_in_chromium_without_script_errors(tmp_path: Path):
    latent, coords = _latent()
    attack = "<script>document.documentElement.setAttribute('data-pwned', 1)</script>"
    latent.ids[0] = f'</script>{attack} "quotes" & <b>ümlaut</b>'
    latent.sources[1] = "<!-- not a comment"
    metrics = latent_metrics(latent, coords)
    path = write_html(tmp_path / "map.html", latent, coords, "test <map>", metrics)
    dom, problems = open_in_chromium(path, tmp_path)
    assert problems == []
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert f'data-rendered="{len(latent)}"' in html_tag
    assert 'data-colouring="modality"' in html_tag
    assert "data-pwned" not in html_tag  # the id stayed text, its script never ran
    assert dom.count("<circle") == len(latent)
    # Hover text: every circle has a title naming its id and source file.
    assert "source: /data/file_7.nii.gz" in dom and "id: id-7" in dom
    assert "&lt;b&gt;ümlaut&lt;/b&gt;" in dom
    assert "kNN accuracy" in dom  # the metrics table


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # An uncaught error at run time, before the marker is set.
        ("colour(data.colourings[0]);", "colour(noSuchVariable);"),
        # A syntax error: the main script never runs.
        ('"use strict";', '"use strict"; var = ;'),
        # A page that draws everything but logs an error.
        ("colour(data.colourings[0]);", 'colour(data.colourings[0]); console.error("boom");'),
        # Broken point data.
        ('"points": [', '"points": [,'),
    ],
)
def test_chromium_check_detects_a_broken_page(tmp_path: Path, old: str, new: str):
    latent, coords = _latent()
    text = render_html(latent, coords, "broken")
    assert old in text
    path = tmp_path / "broken.html"
    path.write_text(text.replace(old, new, 1))
    _, problems = open_in_chromium(path, tmp_path)
    assert problems, "a page with a script error passed the check"


def test_html_without_javascript_guard_fails_the_check(tmp_path: Path):
    path = tmp_path / "static.html"
    path.write_text("<!DOCTYPE html><html><body><svg></svg></body></html>")
    _, problems = open_in_chromium(path, tmp_path)
    assert problems == ["the page never set data-rendered"]


# ---------------------------------------------------------------- omnienc umap


def test_umap_cli_reports_a_missing_input_in_one_line(tmp_path: Path, capsys):
    missing = tmp_path / "missing.nii.gz"
    code = main(["umap", "--random", "resconv_tiny", str(missing), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert str(missing) in err and "no such file" in err
    code = main(["umap", "--random", "resconv_tiny", "structures:a.nii.gz", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "bad structures spec" in err
    assert not (tmp_path / "out").exists()


def test_umap_cli_needs_an_input(tmp_path: Path):
    with pytest.raises(SystemExit, match="at least one INPUT"):
        main(["umap", "checkpoints/omnienc-cpu30min", "-o", str(tmp_path)])


@pytest.mark.slow
def test_umap_cli_end_to_end(tmp_path: Path, volumes: Path):
    """Checkpoint + random floor on real volumes, crops and MedMNIST: every file, every number."""
    ts = volumes / TS
    out = tmp_path / "umap"
    cmd = [
        str(Path(sys.executable).with_name("omnienc")),
        "umap",
        "checkpoints/omnienc-cpu30min",
        str(ts / "example_ct_sm.nii.gz"),
        str(ts / "example_mr_sm.nii.gz"),
        f"structures:{ts / 'example_ct_sm.nii.gz'}:{ts / 'example_seg.nii.gz'}",
        f"structures:{ts / 'example_mr_sm.nii.gz'}:{ts / 'example_seg_mr.nii.gz'}",
        "medmnist:breastmnist:28:test",
        "--max-per-input",
        "20",
        "-o",
        str(out),
        "-q",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trustworthiness" in run.stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert [m["tag"] for m in doc["maps"]] == ["pretrained", "random-init"]
    assert doc["maps"][0]["checkpoint"].startswith("sha256:")
    assert doc["maps"][1]["checkpoint"] == "random:resconv_small:0"
    n = doc["maps"][0]["n"]
    assert n == 2 + 20 + 20 + 20
    for tag in ("pretrained", "random-init"):
        rows = list(csv.DictReader((out / f"{tag}.csv").open()))
        assert len(rows) == n
        assert (out / f"{tag}.png").read_bytes()[:4] == b"\x89PNG"
        _, problems = open_in_chromium(out / f"{tag}.html", tmp_path)
        assert problems == []
    colourings = {c["colouring"]: c for c in doc["maps"][0]["metrics"]["colourings"]}
    assert {"modality", "dataset", "label", "group", "label within breastmnist 28"} <= set(
        colourings
    )
    assert colourings["modality"]["classes"] == {"CT": 21, "MR": 21, "US": 20}
