"""Shared fixtures: the real data root and small helpers to copy real files into tmp folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
