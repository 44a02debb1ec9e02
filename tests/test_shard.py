"""``--shard K/N``: the N shards are disjoint, together equal the unsharded run, on any host."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from omnienc.cli import main
from omnienc.data.folder import VolumeFolder
from omnienc.pretext.masks import load_masks
from omnienc.shard import Shard, relative_key

# Small real volumes (one in a subfolder, so that relative paths matter); masks take ~1 s.
FILES = (
    "nibabel/anatomical.nii",
    "pyradiomics/prostate_phantom_subvolume.nrrd",
    "monai/reoriented_anat_moved.nii",
)


@pytest.fixture
def corpus(copy_real, tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    copy_real(FILES[0], FILES[1], dest=root)
    copy_real(FILES[2], dest=root / "sub")
    return root


def test_parse_and_str() -> None:
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    assert Shard.parse(" 1 / 1 ") == Shard(1, 1)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("0/4", "K must be in 1..4 (shards are numbered from 1"),
        ("5/4", "K must be in 1..4"),
        ("1/0", "N must be at least 1"),
        ("3", "is not K/N"),
        ("a/b", "is not K/N"),
        ("-1/4", "is not K/N"),
    ],
)
def test_bad_shards_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        Shard.parse(spec)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_shards_partition_any_order_the_same_way(n: int) -> None:
    items = [f"case{i:03d}/ct.nii.gz" for i in range(17)]
    shuffled = random.Random(n).sample(items, len(items))
    shards = [Shard(k, n).select(items, key=str) for k in range(1, n + 1)]
    assert shards == [Shard(k, n).select(shuffled, key=str) for k in range(1, n + 1)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_output_path() -> None:
    assert Shard(2, 4).output_path("out/feats.npz") == Path("out/feats.shard-2-of-4.npz")


def test_relative_key_is_posix_and_ignores_the_root(tmp_path: Path) -> None:
    a = relative_key(tmp_path / "x", tmp_path / "x" / "a" / "b.nii")
    b = relative_key(Path("/elsewhere/x"), Path("/elsewhere/x/a/b.nii"))
    assert a == b == ("a/b.nii", "")


def test_folder_shards_are_disjoint_and_cover_the_folder(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    whole = {e.source for e in VolumeFolder(corpus, cache_dir=cache, progress=False).entries}
    parts = [
        {e.source for e in VolumeFolder(corpus, cache_dir=cache, progress=False, shard=s).entries}
        for s in (Shard(1, 2), Shard(2, 2))
    ]
    assert parts[0] | parts[1] == whole and not parts[0] & parts[1]
    assert len(whole) == 3
    # Sorted by relative path: anatomical.nii, prostate_phantom_subvolume.nrrd, sub/reoriented...
    assert {Path(s).name for s in parts[1]} == {"prostate_phantom_subvolume.nrrd"}


def _cache(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_masks_shards_union_equals_the_unsharded_run(corpus: Path, tmp_path: Path, capsys) -> None:
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    assert main(["masks", str(corpus), "--cache-dir", str(alone), "-q"]) == 0
    per_shard = []
    for k in (1, 2, 3):
        own = tmp_path / f"shard{k}"
        for cache in (own, shared):
            assert (
                main(["masks", str(corpus), "--cache-dir", str(cache), "-q", "--shard", f"{k}/3"])
                == 0
            )
        per_shard.append(set(_cache(own)))
        assert f"shard {k}/3: 1 volumes" in capsys.readouterr().out
    assert all(not (a & b) for i, a in enumerate(per_shard) for b in per_shard[i + 1 :])
    want = _cache(alone)
    assert set.union(*per_shard) == set(want)
    got = _cache(shared)
    assert set(got) == set(want)
    for name in want:
        if "-masks-" in name:
            assert np.array_equal(load_masks(shared / name), load_masks(alone / name)), name


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "one/two"])
def test_masks_cli_refuses_a_bad_shard(corpus: Path, spec: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["masks", str(corpus), "--shard", spec])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shard: shard" in err and spec in err, err


def test_embed_shards_union_equals_the_unsharded_run(
    corpus: Path, copy_real, tmp_path: Path, capsys
) -> None:
    single = copy_real(FILES[0], dest=tmp_path / "single")[0]
    out = tmp_path / "feats.npz"
    inputs = [str(corpus), str(single)]
    common = ["--random", "resconv_tiny", "--cache-dir", str(tmp_path / "c"), "-q", "-o", str(out)]
    assert main(["embed", *inputs, *common]) == 0
    with np.load(out) as z:
        whole = dict(zip(z["ids"].tolist(), z["features"], strict=True))
    rows: dict[str, np.ndarray] = {}
    for k in (1, 2):
        assert main(["embed", *inputs, *common, "--shard", f"{k}/2"]) == 0
        with np.load(tmp_path / f"feats.shard-{k}-of-2.npz") as z:
            part = dict(zip(z["ids"].tolist(), z["features"], strict=True))
            assert f'"shard": "{k}/2"' in str(z["meta"])
        assert not set(part) & set(rows)
        rows.update(part)
    assert set(rows) == set(whole) and len(whole) == 4
    for key, feats in whole.items():
        np.testing.assert_allclose(rows[key], feats, rtol=1e-5, atol=1e-6)
