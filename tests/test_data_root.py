"""resolve_data_root: --data, then $OMNIENC_DATA, then ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

import omnienc.data.root as root_module
from omnienc.data.root import ENV_VAR, resolve_data_root
from omnienc.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_explicit_folder_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(ENV_VAR, str(env))
    assert resolve_data_root(explicit) == explicit.resolve()
    assert resolve_data_root(str(explicit)) == explicit.resolve()


def test_env_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    monkeypatch.chdir(REPO_ROOT)  # where the default would be found
    assert resolve_data_root() == tmp_path.resolve()


def test_missing_explicit_folder_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # must not be used as a fallback
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        resolve_data_root(missing)
    assert str(missing) in str(info.value)


def test_explicit_file_is_an_error_naming_it(tmp_path: Path):
    file = tmp_path / "data.txt"
    file.write_text("x")
    with pytest.raises(DataError, match="not a folder") as info:
        resolve_data_root(file)
    assert str(file) in str(info.value)


def test_missing_env_folder_is_an_error_naming_it_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(ENV_VAR, str(missing))
    monkeypatch.chdir(REPO_ROOT)  # the default exists, but a broken $OMNIENC_DATA is an error
    with pytest.raises(DataError, match=ENV_VAR) as info:
        resolve_data_root()
    assert str(missing) in str(info.value)


def test_default_is_shared_data_beside_the_repo(monkeypatch: pytest.MonkeyPatch):
    expected = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not expected.is_dir():  # pragma: no cover - CI always has ../shared/data
        pytest.skip(f"{expected} is not there")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(REPO_ROOT)
    assert resolve_data_root() == expected


def test_empty_env_var_counts_as_unset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.chdir(REPO_ROOT)
    assert resolve_data_root() == (REPO_ROOT / ".." / "shared" / "data").resolve()


def test_no_candidate_is_an_error_naming_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(ENV_VAR, raising=False)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(root_module, "_REPO_ROOT", work)
    with pytest.raises(DataError, match=ENV_VAR) as info:
        resolve_data_root()
    assert str((work / ".." / "shared" / "data").resolve()) in str(info.value)
