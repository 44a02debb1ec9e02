"""Shared fixtures: the real data root and small helpers to copy real files into tmp folders."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omnienc.data.root import resolve_data_root
from omnienc.errors import OmniencError


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (``$OMNIENC_DATA`` or ``../shared/data``); tests need it."""
    try:
        return resolve_data_root()
    except OmniencError as exc:  # pragma: no cover - CI always has ../shared/data
        pytest.fail(f"the real data is needed for the tests: {exc}")


@pytest.fixture(scope="session")
def volumes(data_root: Path) -> Path:
    """``<data root>/volumes``."""
    return data_root / "volumes"


@pytest.fixture
def copy_real(tmp_path: Path, volumes: Path):
    """Copy real files (paths relative to ``volumes/``) into a tmp folder; returns the copies."""

    def copy(*relative: str, dest: Path | None = None) -> list[Path]:
        out = dest or tmp_path
        out.mkdir(parents=True, exist_ok=True)
        copies = []
        for rel in relative:
            src = volumes / rel
            target = out / src.name
            if src.is_dir():
                shutil.copytree(src, target)
            else:
                shutil.copyfile(src, target)
            copies.append(target)
        return copies

    return copy


@pytest.fixture
def medsegbench_root(tmp_path: Path) -> Path:
    """A folder with ``busi_128.npz`` in the medsegbench package's format (2 images per split).

    MedSegBench's files are on Zenodo only, out of reach here; each image is noise with one
    bright disk, and the disk is its mask.
    """
    import numpy as np

    size, n = 128, 2
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    arrays = {}
    for split in ("train", "val", "test"):
        images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
        masks = np.zeros((n, size, size), np.uint8)
        for i in range(n):
            cy, cx = rng.integers(30, size - 30, 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 20**2
            images[i][disk] = 200
            masks[i][disk] = 1
        arrays[f"{split}_images"], arrays[f"{split}_label"] = images, masks
    folder = tmp_path / "medsegbench"
    folder.mkdir()
    np.savez_compressed(folder / f"busi_{size}.npz", **arrays)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
