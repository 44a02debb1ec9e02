"""Two "hosts" share one file system: same caches and checkpoint, nothing of a third host lost.

Two processes play hosts ``alpha`` and ``beta`` (``OMNIENC_HOSTNAME``, which
:func:`omnienc.atomic.hostname` reads wherever a host name is needed). After a barrier, both
run ``omnienc masks`` on the same folder and cache and then save the same encoder checkpoint
ten times, so their atomic writes and checkpoint swaps overlap. Beforehand the shared folder
gets temporaries of a third host ``gamma`` (whose process ids mean nothing here) and one of
``alpha`` whose process is dead, beside the checkpoint (which both hosts write every time).
Afterwards the cache and the checkpoint equal a single run's, ``alpha``'s dead temporary is
gone, ``gamma``'s recent ones are untouched (neither deleted nor restored) and its day-old one
is deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.atomic import FOREIGN_TEMP_MAX_AGE_S, pid_alive
from omnienc.benchmarks.robustness.interrupts import leftovers
from omnienc.checkpoint import file_sha256, load_encoder, save_encoder
from omnienc.cli import main
from omnienc.encoders import build_encoder
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.masks import load_masks

FILES = ("nibabel/anatomical.nii", "pyradiomics/prostate_phantom_subvolume.nrrd")
SAVES = 10

WORKER = """
import sys, time
from pathlib import Path
import torch
from omnienc.checkpoint import save_encoder
from omnienc.cli import main
from omnienc.encoders import build_encoder
from omnienc.preprocessing import Preprocessing

data, cache, ckpt, barrier, me, saves = sys.argv[1:]
Path(barrier, me).touch()
while len(list(Path(barrier).iterdir())) < 2:  # both imported: start together
    time.sleep(0.01)
assert main(["masks", data, "--cache-dir", cache, "-q"]) == 0
for _ in range(int(saves)):
    torch.manual_seed(0)
    save_encoder(build_encoder("resconv_tiny"), ckpt, Preprocessing(), meta={"step": 1})
"""


def _dead_pid() -> int:
    pid = 4_000_000
    while pid_alive(pid):
        pid -= 1
    return pid


def _save_alone(path: Path) -> Path:
    torch.manual_seed(0)
    return save_encoder(build_encoder("resconv_tiny"), path, Preprocessing(), meta={"step": 1})


def _plant(folder: Path, name: str, *, aside: bool = False, age: float = 0.0) -> Path:
    """A leftover temporary (a folder when ``aside``, holding a config.json like a real aside)."""
    path = folder / name
    if aside:
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"format": "omnienc-encoder"}))
    else:
        path.write_bytes(b"half-written")
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


@pytest.mark.slow
def test_two_hosts_share_caches_and_a_checkpoint(copy_real, tmp_path: Path) -> None:
    data = tmp_path / "data"
    copy_real(*FILES, dest=data)
    alone = tmp_path / "alone"
    assert main(["masks", str(data), "--cache-dir", str(alone / "cache"), "-q"]) == 0
    want_ckpt = _save_alone(alone / "ckpt")
    shared = tmp_path / "shared"
    (shared / "cache").mkdir(parents=True)
    mask_name = next(p.name for p in (alone / "cache").iterdir() if "-masks-" in p.name)
    dead = _dead_pid()
    keep = [
        _plant(shared / "cache", f".{mask_name}.tmp-gamma-{dead}-0000000a"),
        _plant(shared, f".ckpt.tmp-gamma-{dead}-0000000b", aside=True),
        _plant(shared, f".ckpt.old-gamma-{dead}-0000000c", aside=True),
    ]
    gone = [
        _plant(shared, f".ckpt.tmp-alpha-{dead}-0000000d", aside=True),
        _plant(shared, f".ckpt.tmp-gamma-{dead}-0000000e", age=FOREIGN_TEMP_MAX_AGE_S + 60),
    ]

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for host in ("alpha", "beta"):
        env = {**os.environ, "OMNIENC_HOSTNAME": host, "OMP_NUM_THREADS": "1"}
        argv = [str(data), str(shared / "cache"), str(shared / "ckpt"), str(barrier), host]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv, str(SAVES)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]

    assert all(p.exists() for p in keep), [p.name for p in keep if not p.exists()]
    assert not any(p.exists() for p in gone), [p.name for p in gone if p.exists()]
    assert leftovers(shared) == sorted(keep)
    names = sorted(p.name for p in (shared / "cache").iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in (alone / "cache").iterdir())
    for name in names:
        if "-masks-" in name:
            got, want = load_masks(shared / "cache" / name), load_masks(alone / "cache" / name)
            assert np.array_equal(got, want), name
        else:
            with np.load(shared / "cache" / name) as a, np.load(alone / "cache" / name) as b:
                assert np.array_equal(a["image"], b["image"]), name
    ckpt = shared / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert file_sha256(ckpt / "model.safetensors") == file_sha256(want_ckpt / "model.safetensors")
    assert (ckpt / "config.json").read_text() == (want_ckpt / "config.json").read_text()
    assert load_encoder(ckpt)
