"""Cross-volume pairs on real CT: grouping, registration onto a scan, the cache, the draws."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.corpus import CachedVolume, InMemoryVolume, PackedMasks, save_npy_atomic
from omnienc.pretext.crossvolume import (
    CrossConfig,
    PartnerViews,
    corpus_partners,
    partner_indices,
    partner_view,
    partner_views,
)
from omnienc.pretext.data import DataConfig, PairDataset, PretrainDataModule
from omnienc.pretext.pairs import PairConfig, sample_pair
from omnienc.registration import RegistrationConfig

SPACING = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def ct(volumes: Path) -> np.ndarray:
    """``(1, 122, 101, 112)`` float32: the whole abdominal CT, windowed to [0, 1]."""
    hu = np.asarray(nib.load(volumes / "totalsegmentator/example_ct.nii.gz").dataobj, np.float32)
    return ((np.clip(hu, -1000, 1000) + 1000) / 2000)[None]


def test_groups_pair_their_volumes_both_ways():
    sources = ["/d/ct/a.nii.gz", "/d/ct/b.nii.gz", "/d/mr/c.nii.gz", "/d/mr/d.nii.gz", "/d/x.nii"]
    partners = partner_indices(sources, [["ct/*.nii.gz"], ["mr/c.nii.gz", "mr/d.nii.gz"]])
    assert partners == [[1], [0], [3], [2], []]
    # A volume in two groups pairs with the members of both.
    assert partner_indices(sources, [["a.nii.gz", "b.nii.gz"], ["a.nii.gz", "x.nii"]])[0] == [1, 4]


def test_groups_that_match_too_little_are_refused():
    sources = ["/d/ct/a.nii.gz", "/d/ct/b.nii.gz"]
    with pytest.raises(ValueError, match=r"groups\[0\].*'ct/missing\*' matches no volume"):
        partner_indices(sources, [["ct/missing*"]])
    with pytest.raises(ValueError, match=r"groups\[1\] matches one volume only \(/d/ct/a.nii.gz\)"):
        partner_indices(sources, [["ct/*"], ["a.nii.gz"]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 1.5}, "fraction must be in"),
        ({"spacing": 0.0}, "spacing must be > 0"),
        ({"z_search": -1.0}, "z_search must be >= 0"),
        ({"groups": [["a", ""]]}, "non-empty path patterns"),
        ({"groups": ["ct/*"]}, "a list of lists of path patterns"),
    ],
)
def test_cross_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossConfig(**kwargs)
    with pytest.raises(ValueError, match="z_search"):
        RegistrationConfig(z_search=-2.0)


def test_a_shifted_crop_of_the_scan_registers_back_onto_it(ct: np.ndarray):
    img = ct[:, 10:90, 10:80, 40:90]  # (1, 80, 70, 50): 240 x 210 x 150 mm
    partner = img[:, 6:74, 4:62, 3:47]  # moved by (6, 4, 3) voxels, smaller
    unregistered = np.corrcoef(img[:, :68, :58, :44].ravel(), partner.ravel())[0, 1]
    assert unregistered < 0.3
    for deformable, least in ((False, 0.99), (True, 0.85)):
        cfg = CrossConfig(deformable=deformable).registration()
        view, coverage = partner_view(img, SPACING, partner, SPACING, cfg)
        assert view.shape == img.shape and view.dtype == np.float32
        inside = view != img
        assert 0.5 < coverage < 0.9 and abs(coverage - inside.mean()) < 0.05
        # Where the partner reaches it is the scan again: a translation, found by the affine;
        # demons on the coarse grid blur it a little (they are for other subjects' anatomy).
        corr = np.corrcoef(view[inside], img[inside])[0, 1]
        assert corr > least, (deformable, corr)


@pytest.mark.parametrize("top", [10, 80])
def test_the_z_search_places_a_slab_where_it_was_cut(ct: np.ndarray, top: int):
    """A 42 mm slab of the abdomen: centring it misplaces it, the search puts it back."""
    slab = ct[..., top : top + 14]
    cfg = CrossConfig(z_search=8.0).registration()
    centred = CrossConfig(z_search=0.0).registration()
    reached = {}
    for name, c in (("search", cfg), ("centred", centred)):
        view, _ = partner_view(ct, SPACING, slab, SPACING, c)
        z = np.flatnonzero(np.any(view[0] != ct[0], axis=(0, 1)))
        reached[name] = (int(z.min()), int(z.max()))
    lo, hi = reached["search"]
    assert abs(lo - top) <= 2 and abs(hi - (top + 13)) <= 2, reached
    assert abs(reached["centred"][0] - top) > 10, reached  # why the search exists


def _cached(folder: Path, name: str, image: np.ndarray) -> CachedVolume:
    image_file = folder / f"{name}.image.npy"
    mask_file = folder / f"{name}-masks.zbits.npy"
    save_npy_atomic(image_file, image)
    save_npy_atomic(mask_file, PackedMasks.pack(np.zeros((1, *image.shape[1:]), bool)).packed)
    return CachedVolume(str(image_file), str(mask_file), image.shape[1:], 1)


def test_views_are_cached_reused_and_rebuilt_when_damaged(ct, tmp_path: Path, caplog):
    a, b = ct[:, 10:70, 10:70, 40:80], ct[:, 14:70, 12:66, 42:78]
    vols = [_cached(tmp_path, "a", a), _cached(tmp_path, "b", b)]
    cfg = CrossConfig(deformable=False)
    views = partner_views(vols, [SPACING] * 2, [[1], [0]], cfg, progress=False)
    files = [Path(v[0]) for v in views]
    assert [np.load(f).shape for f in files] == [a.shape, b.shape]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert partner_views(vols, [SPACING] * 2, [[1], [0]], cfg, progress=False) == views
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not registered again
    # Other settings are another file; a damaged view is rebuilt with a warning.
    other = partner_views(vols, [SPACING] * 2, [[1], [0]], CrossConfig(), progress=False)
    assert other[0] != views[0]
    files[0].write_bytes(files[0].read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="omnienc"):
        partner_views(vols, [SPACING] * 2, [[1], [0]], cfg, progress=False)
    assert "damaged cache sidecar" in caplog.text and files[0].name in caplog.text
    assert np.load(files[0]).shape == a.shape
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("shape", [(40, 36, 30), (20, 36, 12)])  # the second is padded
def test_the_query_crop_comes_from_the_source_and_the_tasks_do_not_change(shape):
    rng = np.random.default_rng(0)
    image = rng.random((1, *shape), dtype=np.float32)
    masks = np.zeros((3, *shape), bool)
    masks[0, 2:18, 4:20, 2:10] = masks[1, 10:, 10:, 5:] = masks[2, :8, :, :] = True
    config = PairConfig(crop_size=(16, 16, 16), max_tasks=2, min_task_voxels=8)
    plain = sample_pair(image, masks, config, np.random.default_rng(5))
    source = image + 10.0
    crossed = sample_pair(image, masks, config, np.random.default_rng(5), query_source=source)
    for key in ("ref_image", "ref_masks", "query_masks", "task_valid", "query_origin"):
        np.testing.assert_array_equal(crossed[key], plain[key])
    inside = plain["query_image"] > image.min()  # padding: each array's own minimum
    np.testing.assert_allclose(crossed["query_image"][inside], plain["query_image"][inside] + 10)
    np.testing.assert_allclose(crossed["query_image"][~inside], source.min())
    with pytest.raises(ValueError, match="query_source must be"):
        sample_pair(image, masks, config, rng, query_source=source[:, :-1])


def test_partner_views_draw_their_share_from_the_volumes_with_partners(tmp_path: Path):
    view = tmp_path / "v.view.npy"
    np.save(view, np.zeros((1, 4, 4, 4), np.float32))
    views = PartnerViews([[], [str(view)], []], fraction=0.3)
    rng = np.random.default_rng(1)
    draws = [views.draw(rng) for _ in range(4000)]
    crossed = [d for d in draws if d is not None]
    assert abs(len(crossed) / 4000 - 0.3) < 0.03
    assert {v for v, _ in crossed} == {1} and crossed[0][1].shape == (1, 4, 4, 4)
    # No share draws nothing and leaves the generator untouched.
    rng, ref = np.random.default_rng(2), np.random.default_rng(2)
    assert PartnerViews([[str(view)]], 0.0).draw(rng) is None
    assert rng.random() == ref.random()
    view.write_bytes(b"not a npy")
    with pytest.raises(DataError, match=r"v\.view\.npy.*cannot map the cross-volume partner"):
        PartnerViews([[str(view)]], 1.0).draw(np.random.default_rng(0))


def test_a_partner_that_cannot_be_registered_names_both_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    vols = [
        _cached(tmp_path, "scan", rng.random((1, 40, 40, 40), dtype=np.float32)),
        _cached(tmp_path, "blank", np.zeros((1, 8, 8, 8), np.float32)),
    ]
    with pytest.raises(DataError, match=r"scan\.image\.npy: cannot register .*blank\.image\.npy"):
        partner_views(vols, [SPACING] * 2, [[1], []], CrossConfig(), progress=False)


def test_without_a_share_the_sample_stream_is_the_one_without_cross_pairs(
    ct: np.ndarray, tmp_path: Path
):
    cube = ct[:, 20:60, 20:60, 40:80]
    masks = np.zeros((2, *cube.shape[1:]), bool)
    masks[0, 5:25, 5:25, 5:25] = masks[1, 15:, 10:30, :] = True
    vols = [InMemoryVolume(cube, masks), InMemoryVolume(cube[:, ::-1].copy(), masks[:, ::-1])]
    view = tmp_path / "v.view.npy"
    np.save(view, cube + 1.0)
    pair = PairConfig(crop_size=(16, 16, 16), max_tasks=2, min_task_voxels=8)

    def items(partners):
        ds = PairDataset(vols, np.ones(2), pair, seed=3, partners=partners)
        return [ds[i] for i in range(6)]

    for a, b in zip(items(None), items(PartnerViews([[str(view)], []], 0.0)), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    crossed = items(PartnerViews([[str(view)], []], 1.0))
    assert any(
        not torch.equal(a["query_image"], c["query_image"])
        for a, c in zip(items(None), crossed, strict=True)
    )
    # A zero share registers nothing at all.
    assert corpus_partners([], [], [], CrossConfig(groups=[["a", "b"]], fraction=0.0)) is None


def _module(root: Path, cache: Path, groups, control: bool = False) -> PretrainDataModule:
    cfg = DataConfig(
        batch_size=2,
        steps_per_epoch=1,
        pair=PairConfig(crop_size=(24, 24, 24), max_tasks=2),
        preprocessing=Preprocessing(spacing=SPACING),
        cache_dir=str(cache),
        augment_on="cpu",
        cross=CrossConfig(groups=groups, fraction=1.0, control=control),
    )
    return PretrainDataModule(cfg, data_root=root, seed=0)


def test_the_data_module_registers_its_groups_and_serves_cross_pairs(volumes, tmp_path: Path):
    (tmp_path / "volumes" / "ct").mkdir(parents=True)
    for rel in (
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/pulmonary_ct_cropped.nii.gz",
    ):
        shutil.copyfile(volumes / rel, tmp_path / "volumes" / "ct" / Path(rel).name)
    shutil.copyfile(
        volumes / "totalsegmentator/example_mr_sm.nii.gz", tmp_path / "volumes" / "mr.nii.gz"
    )
    dm = _module(tmp_path, tmp_path / "cache", [["ct/*.nii.gz"]])
    dm.prepare_data()
    dm.setup()
    assert dm.dataset is not None and dm.dataset.partners is not None
    by_source = {
        Path(s).name: v for s, v in zip(dm.sources, dm.dataset.partners.views, strict=False)
    }
    assert len(by_source["example_ct_sm.nii.gz"]) == 1 and not by_source["mr.nii.gz"]
    assert all(Path(v[0]).exists() for v in dm.dataset.partners.views if v)
    batch = next(iter(dm.train_dataloader()))
    assert batch["query_image"].shape == (2, 1, 24, 24, 24)
    # The control draws the same samples with each query from the volume's own scan.
    control = _module(tmp_path, tmp_path / "cache", [["ct/*.nii.gz"]], control=True)
    control.setup()
    assert control.dataset is not None and control.dataset.partners is not None
    assert control.dataset.partners.views == [
        [v.image_file] if views else []
        for v, views in zip(control.dataset.volumes, dm.dataset.partners.views, strict=True)
    ]
    with pytest.raises(ValueError, match="'mr/\\*' matches no volume"):
        _module(tmp_path, tmp_path / "cache", [["mr/*"]]).setup()
