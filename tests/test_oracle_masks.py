"""The oracle-mask cache: real label maps replace one scan's proposals, nothing else changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnienc.benchmarks.oracle_masks import write_oracle_cache
from omnienc.data.labeled import read_label_map
from omnienc.errors import DataError
from omnienc.pretext.corpus import MASK_SIDECAR
from omnienc.pretext.masks import load_masks

CONFIG = """\
data:
  roots: [volumes/pyradiomics]
  pair: {crop_size: [16, 16, 16], max_tasks: 2}
  masks: {min_voxels: 20}
"""


@pytest.fixture(scope="module")
def run_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One cache for the module: the folder's preprocessing and proposals are made once."""
    tmp = tmp_path_factory.mktemp("oracle")
    config = tmp / "run.yaml"
    config.write_text(CONFIG)
    return ["--config", str(config), "--data.cache_dir", str(tmp / "cache")]


def test_a_scans_proposals_become_its_label_masks(run_args, data_root: Path, volumes: Path):
    (row,) = write_oracle_cache(run_args, ["pyradiomics_brain1"], data_root)
    assert row["scan"] == "pyradiomics_brain1" and row["proposals"] > 1 and row["oracle"] == 1
    cache_file = Path(str(row["cache_file"]))
    masks = load_masks(cache_file)
    assert masks.shape[0] == 1 and masks.sum() >= 20
    assert not cache_file.with_suffix(MASK_SIDECAR).exists()  # rebuilt by pretraining
    # The lesion keeps about its volume: 1 mm label voxels onto the 2 mm grid, 1/8 each.
    labels = read_label_map(volumes / "pyradiomics/brain1_label.nrrd")
    spacing = np.prod(labels.spacing)
    native_mm3 = float((np.rint(labels.array) == 1).sum() * spacing)
    assert 0.5 < masks.sum() * 8.0 / native_mm3 < 2.0
    # The other scans of the folder keep their proposals.
    others = [p for p in cache_file.parent.glob("*-masks-*.npz") if p != cache_file]
    assert others and all(len(load_masks(p)) > 1 for p in others)


def test_unknown_scan_is_refused_before_any_work(tmp_path: Path, data_root: Path):
    args = ["--config", "does-not-matter.yaml", "--data.cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="unknown scans"):
        write_oracle_cache(args, ["no_such_scan"], data_root)
    assert not (tmp_path / "cache").exists()


def test_scan_outside_the_corpus_names_the_file(run_args, data_root: Path):
    with pytest.raises(DataError, match=r"example_ct_sm\.nii\.gz.*not in the pretraining corpus"):
        write_oracle_cache(run_args, ["ct_sm"], data_root)
