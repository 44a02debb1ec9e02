"""atomic_target: the old file until success, the complete new one after, no leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from omnienc.atomic import atomic_target, write_bytes_atomic


def test_replaces_the_file_only_on_success(tmp_path: Path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_target(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".") and tmp != path
        tmp.write_bytes(b"new contents")
        assert path.read_bytes() == b"old"  # a reader still sees the old file
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_target(path) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_exception_before_any_write_leaves_nothing(tmp_path: Path):
    path = tmp_path / "sub" / "new.bin"
    with pytest.raises(KeyError):
        with atomic_target(path):
            raise KeyError("x")
    assert not path.exists()
    assert os.listdir(tmp_path / "sub") == []


def test_suffix_ends_the_temporary_name(tmp_path: Path):
    with atomic_target(tmp_path / "v.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "v.nii.gz").read_bytes() == b"x"


def test_write_bytes_atomic_creates_parents_and_overwrites(tmp_path: Path):
    path = tmp_path / "a" / "b" / "c.bin"
    assert write_bytes_atomic(path, b"one") == path
    assert write_bytes_atomic(path, b"two") == path
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["c.bin"]


def _dead_pid() -> int:
    import os

    from omnienc.atomic import pid_alive

    pid = 4_000_000
    while pid_alive(pid):
        pid -= 1
    assert pid != os.getpid()
    return pid


def test_next_write_removes_a_killed_writers_temporaries_only(tmp_path):
    import os

    from omnienc.atomic import write_bytes_atomic

    target = tmp_path / "cache.npz"
    dead = tmp_path / f".cache.npz.tmp-{_dead_pid()}-0123abcd"
    dead.write_bytes(b"half")
    live = tmp_path / f".cache.npz.tmp-{os.getpid()}-89abcdef"  # a concurrent writer's
    live.write_bytes(b"busy")
    other = tmp_path / f".other.npz.tmp-{_dead_pid()}-0123abcd"
    other.write_bytes(b"not ours")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_temporaries_name_the_host_and_the_process(tmp_path, monkeypatch):
    import os

    from omnienc.atomic import hostname, temp_sibling

    monkeypatch.setenv("OMNIENC_HOSTNAME", "node-07.cluster")
    assert hostname() == "node_07.cluster"
    tmp = temp_sibling(tmp_path / "x.npz")
    assert tmp.name.startswith(f".x.npz.tmp-node_07.cluster-{os.getpid()}-")
    monkeypatch.setenv("OMNIENC_HOSTNAME", "n" * 80)
    long = hostname()
    assert len(long) == 40 and long.startswith("n" * 31 + "_") and long == hostname()


def test_cleanup_leaves_other_hosts_temporaries_until_they_are_a_day_old(tmp_path, monkeypatch):
    import os
    import time

    from omnienc.atomic import FOREIGN_TEMP_MAX_AGE_S, write_bytes_atomic

    monkeypatch.setenv("OMNIENC_HOSTNAME", "alpha")
    target = tmp_path / "cache.npz"
    dead = _dead_pid()
    mine_dead = tmp_path / f".cache.npz.tmp-alpha-{dead}-0123abcd"
    mine_live = tmp_path / f".cache.npz.tmp-alpha-{os.getpid()}-0123abce"
    # Another host's writer: its PID means nothing here (dead here, maybe alive there).
    theirs = tmp_path / f".cache.npz.tmp-beta-{dead}-0123abcf"
    theirs_old = tmp_path / f".cache.npz.tmp-beta-{dead}-0123abd0.nii.gz"
    legacy_dead = tmp_path / f".cache.npz.tmp-{dead}-0123abd1"
    for p in (mine_dead, mine_live, theirs, theirs_old, legacy_dead):
        p.write_bytes(b"half")
    old = time.time() - FOREIGN_TEMP_MAX_AGE_S - 60
    os.utime(theirs_old, (old, old))
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not mine_dead.exists() and not legacy_dead.exists() and not theirs_old.exists()
    assert mine_live.exists() and theirs.exists()
    monkeypatch.setenv("OMNIENC_HOSTNAME", "beta")  # on beta, the same file is beta's own
    write_bytes_atomic(target, b"newer")
    assert not theirs.exists() and mine_live.exists()
