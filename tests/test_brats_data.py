"""omnienc.data.brats on the real BraTS cases: finding cases, labels, brain mask, regions."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from omnienc.data.brats import (
    BRAIN_MASK_FILE,
    LABEL_FILE,
    SEQUENCES,
    TUMOUR_REGIONS,
    BratsCase,
    find_brats_cases,
    tumour_region,
)
from omnienc.errors import DataError

CASES = [f"brats_2013_pat000{i}_1" for i in (3, 4, 5, 6)]


@pytest.fixture(scope="module")
def case(data_root: Path) -> BratsCase:
    return find_brats_cases(data_root)[0]


@pytest.fixture(scope="module")
def labels(case: BratsCase) -> np.ndarray:
    return case.read_labels(case.read_image("flair"))


def copy_case(case: BratsCase, dest: Path) -> BratsCase:
    """A copy of a case folder (the four files the benchmark reads) under ``dest``."""
    folder = dest / case.name
    folder.mkdir(parents=True)
    for name in (*SEQUENCES.values(), LABEL_FILE, BRAIN_MASK_FILE):
        shutil.copyfile(case.folder / name, folder / name)
    return BratsCase(case.name, folder)


def write_like(path: Path, array: np.ndarray, like: Path) -> None:
    """Save ``array`` as float32 NIfTI with the affine of ``like`` (as the BraTS files are)."""
    affine = nib.load(like).affine  # type: ignore[attr-defined]
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), path)


@pytest.mark.parametrize("under", ["", "volumes", "volumes/brats"])
def test_find_brats_cases_from_any_level(data_root: Path, under: str) -> None:
    cases = find_brats_cases(data_root / under if under else data_root)
    assert [c.name for c in cases] == CASES
    assert all(c.image_path("flair").is_file() and c.brain_mask_path.is_file() for c in cases)


def test_find_brats_cases_without_cases_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "not_a_case").mkdir()
    (tmp_path / "not_a_case" / LABEL_FILE).write_bytes(b"")  # no sequences beside it
    with pytest.raises(DataError, match="no BraTS case folder") as err:
        find_brats_cases(tmp_path)
    assert err.value.path == tmp_path


def test_read_labels_and_brain_mask_on_the_real_files(case: BratsCase, labels: np.ndarray) -> None:
    image = case.read_image("flair")
    brain = case.read_brain_mask(image)
    assert image.shape == labels.shape == brain.shape == (240, 240, 155)
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert labels.dtype == np.int64 and brain.dtype == bool
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3, 4}
    # The tumour lies in the brain; the brain is a fraction of the field of view.
    assert brain[labels > 0].mean() > 0.99
    assert 0.05 < brain.mean() < 0.5


def test_unknown_sequence(case: BratsCase) -> None:
    with pytest.raises(ValueError, match="unknown BraTS sequence 'dwi'"):
        case.image_path("dwi")


def test_tumour_regions_are_nested(labels: np.ndarray) -> None:
    whole, core, enhancing = (tumour_region(labels, r) for r in TUMOUR_REGIONS)
    assert whole.sum() > core.sum() > enhancing.sum() > 0
    assert not (core & ~whole).any() and not (enhancing & ~core).any()
    assert np.array_equal(whole, labels > 0)
    assert np.array_equal(enhancing, labels == 4)
    with pytest.raises(ValueError, match="unknown tumour region"):
        tumour_region(labels, "necrosis")


def test_labels_outside_0_to_4_name_the_file(
    case: BratsCase, labels: np.ndarray, tmp_path: Path
) -> None:
    bad = copy_case(case, tmp_path)
    wrong = labels.copy()
    wrong[120, 120, 70] = 7
    write_like(bad.label_path, wrong, case.label_path)
    with pytest.raises(DataError, match=r"BraTS labels must be 0\.\.4, found \[7\]") as err:
        bad.read_labels()
    assert err.value.path == bad.label_path


def test_label_grid_differing_from_the_image_names_the_file(
    case: BratsCase, labels: np.ndarray, tmp_path: Path
) -> None:
    bad = copy_case(case, tmp_path)
    write_like(bad.label_path, labels[:, :, :150], case.label_path)
    with pytest.raises(DataError, match="differs from its image") as err:
        bad.read_labels(bad.read_image("flair"))
    assert err.value.path == bad.label_path


def test_brain_mask_grid_differing_from_the_image_names_the_file(
    case: BratsCase, tmp_path: Path
) -> None:
    bad = copy_case(case, tmp_path)
    brain = case.read_brain_mask()
    write_like(bad.brain_mask_path, brain[:200], case.brain_mask_path)
    with pytest.raises(DataError, match="differs from its image") as err:
        bad.read_brain_mask(bad.read_image("t1c"))
    assert err.value.path == bad.brain_mask_path
