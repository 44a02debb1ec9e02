"""Two ``omnienc masks`` processes on the same folder and cache do not corrupt it.

Both processes start together on the same real volumes and the same cache folder, so they
preprocess, propose and write every cache entry at the same time (the worst case for the atomic
writes in :mod:`omnienc.atomic`). Afterwards every cache file must load and equal what a single
process writes alone, and no temporary file may be left.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from omnienc.benchmarks.robustness.interrupts import leftovers, omnienc_command
from omnienc.cli import main
from omnienc.pretext.masks import load_masks

VOLUMES = (
    "totalsegmentator/example_mr_sm.nii.gz",
    "totalsegmentator/example_ct_sm.nii.gz",
    "nibabel/anatomical.nii",
)


def _folder_entry(path: Path) -> dict[str, np.ndarray | dict]:
    """A preprocessing cache entry's arrays, with its manifest minus the cache path."""
    with np.load(path, allow_pickle=False) as z:
        entry = json.loads(str(z["entry"]))
        entry.pop("cache_file")
        return {"image": z["image"], "affine": z["affine"], "entry": entry}


@pytest.mark.slow
def test_two_masks_processes_share_a_folder_and_cache(copy_real, tmp_path: Path):
    data = tmp_path / "data"
    copy_real(*VOLUMES, dest=data)
    shared = tmp_path / "shared-cache"
    command = [*omnienc_command(), "masks", str(data), "--cache-dir", str(shared), "-q"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert f"{len(VOLUMES)} volumes" in out, out

    alone = tmp_path / "single-cache"
    assert main(["masks", str(data), "--cache-dir", str(alone), "-q"]) == 0

    assert leftovers(shared) == []
    names = sorted(p.name for p in shared.iterdir())
    assert names == sorted(p.name for p in alone.iterdir())
    mask_files = [n for n in names if "-masks-" in n]
    assert len(mask_files) == len(VOLUMES) and len(names) == 2 * len(VOLUMES)
    for name in names:
        if name in mask_files:
            assert np.array_equal(load_masks(shared / name), load_masks(alone / name)), name
        else:
            got, want = _folder_entry(shared / name), _folder_entry(alone / name)
            assert got["entry"] == want["entry"], name
            assert np.array_equal(got["image"], want["image"]), name
            assert np.array_equal(got["affine"], want["affine"]), name
