"""``omnienc masks --config CFG``: masks computed ahead of a run land where the run looks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnienc.cli import main
from omnienc.data.folder import VolumeFolder
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.masks import MaskConfig, mask_cache_path, read_mask_settings


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"encoder": "resconv_tiny"}, "data": data}))
    return path


def test_masks_use_the_runs_preprocessing_masks_and_cache(copy_real, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    copy_real("nibabel/anatomical.nii", dest=corpus)
    cache = tmp_path / "run-cache"
    cfg = _config(
        tmp_path,
        {
            "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "masks": {"max_masks": 5},
            "cache_dir": str(cache),
        },
    )
    assert main(["masks", str(corpus), "--config", str(cfg), "-q", "--shard", "1/1"]) == 0
    # What PretrainDataModule builds from the same config (pretext/data.py).
    pre = Preprocessing(spacing=(3.0, 3.0, 3.0))
    (entry,) = VolumeFolder(corpus, pre, cache_dir=cache, progress=False).entries
    assert mask_cache_path(entry, MaskConfig(max_masks=5), cache).is_file()


def test_read_mask_settings_defaults(tmp_path: Path) -> None:
    settings = read_mask_settings(_config(tmp_path, {"roots": ["volumes"]}))
    assert settings.preprocessing == Preprocessing() and settings.masks == {}
    assert settings.cache_dir is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "no such config file"),
        ("data: [unclosed", "not a readable YAML config"),
        ("data: [1, 2]", "the config's `data` must be a mapping"),
        ("data: {masks: {max_maks: 3}}", "invalid data.preprocessing or data.masks: unknown"),
        ("data: {preprocessing: {spacing: [0, 1, 1]}}", "invalid data.preprocessing"),
    ],
)
def test_bad_configs_are_named(tmp_path: Path, text: str | None, problem: str, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError) as info:
        read_mask_settings(path)
    assert str(info.value).startswith(f"{path}: {problem}"), str(info.value)
    assert main(["masks", str(tmp_path), "--config", str(path)]) == 1
    assert f"{path}: {problem}" in capsys.readouterr().err
