"""Oracle masks: a pretraining cache whose task masks are real label maps, for some scans.

The diagnostic of the method issue's first question: is the mask generator what keeps the
in-context head from segmenting across scans? Pretrain the same recipe twice, once on the
classical proposals and once with the proposals of a few labelled scans replaced by their
real structures (the "oracle"), and compare few-shot Dice on queries whose labels the oracle
run never saw. If the oracle run also fails across scans, masks are not the bottleneck.

This module writes the oracle run's mask cache: it builds (or reuses) the cache of the run's
data config in ``--cache-dir``, then overwrites the mask entry of each ``--scans`` scan of the
few-shot catalogue (:data:`omnienc.benchmarks.fewshot_pairs.CATALOGUE`) with one mask per
catalogue structure present on the preprocessed grid (at least ``masks.min_voxels`` voxels),
and removes the entry's memory-mapped sidecar so that pretraining rebuilds it. Every other
volume keeps its proposals. Run::

    cp -r ~/.cache/omnienc runs/oracle-cache     # optional: reuse the proposals computed once
    python -m omnienc.benchmarks.oracle_masks --config configs/cpu-30min.yaml \\
        --cache-dir runs/oracle-cache --scans ct_sm brats_2013_pat0003_1/flair ...
    omnienc pretrain --config configs/cpu-30min.yaml --data.cache_dir runs/oracle-cache ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from omnienc.benchmarks.fewshot_pairs import LabelledScan, scans_by_key
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError
from omnienc.io import read_volume
from omnienc.pretext.corpus import MASK_SIDECAR
from omnienc.pretext.data import PretrainDataModule
from omnienc.pretext.masks import load_masks, mask_cache_path, save_masks
from omnienc.pretext.train import parse_config
from omnienc.transforms import preprocess_volume


def oracle_masks(
    scan: LabelledScan, volumes: Path, module: PretrainDataModule, min_voxels: int
) -> tuple[Path, np.ndarray]:
    """The catalogue structures of one scan as masks on its pretraining cache grid.

    Args:
        scan: The labelled scan.
        volumes: The ``volumes/`` folder of the data root.
        module: The run's data module, prepared (its folders scanned and cached).
        min_voxels: Least voxels a structure needs on the preprocessed grid.

    Returns:
        The mask cache entry to overwrite, and ``(K, X, Y, Z)`` bool masks on that grid.

    Raises:
        DataError: The scan is not in the run's corpus, or its label map does not fit.
    """
    image_path = (volumes / scan.image).resolve()
    entries = [
        e
        for folder in module.volume_folders()
        for e in folder.entries
        if Path(e.source).resolve() == image_path
    ]
    if not entries:
        raise DataError(image_path, "is not in the pretraining corpus of this config")
    entry = entries[0]
    image = read_volume(image_path)
    labels = read_label_map(volumes / scan.labels)
    check_same_grid(image, labels)
    pre = module.config.preprocessing
    out = preprocess_volume(image, pre, label=np.rint(labels.array).astype(np.int16))
    grid = out["label"][0]
    if tuple(grid.shape) != tuple(entry.preprocessed_shape):
        raise DataError(
            volumes / scan.labels,
            f"preprocessed label grid {grid.shape} differs from the cached image "
            f"{tuple(entry.preprocessed_shape)}",
        )
    masks = [np.isin(grid, s.ids) for s in scan.structures]
    kept = [m for m in masks if int(m.sum()) >= min_voxels]
    stack = np.stack(kept) if kept else np.zeros((0, *grid.shape), dtype=bool)
    return mask_cache_path(entry, module.config.masks, module.cache_dir()), stack


def write_oracle_cache(
    argv: Sequence[str], scans: Sequence[str], data_root: str | Path | None = None
) -> list[dict[str, object]]:
    """Prepare the cache of the run ``argv`` describes, then put oracle masks in it.

    Args:
        argv: ``omnienc pretrain`` arguments (``--config``, ``--data.cache_dir``, overrides).
        scans: Catalogue keys of the scans whose proposals the labels replace.
        data_root: The data root (default ``$OMNIENC_DATA`` or ``../shared/data``).

    Returns:
        One row per scan: ``scan``, ``proposals`` (replaced), ``oracle`` (masks written),
        ``cache_file``.
    """
    catalogue = scans_by_key()
    unknown = [k for k in scans if k not in catalogue]
    if unknown:
        raise SystemExit(f"unknown scans {unknown}; known: {sorted(catalogue)}")
    config, _, _ = parse_config(list(argv))
    module = PretrainDataModule(config.data, data_root=data_root or config.data_root)
    module.prepare_data()
    volumes = resolve_data_root(data_root or config.data_root) / "volumes"
    rows: list[dict[str, object]] = []
    for key in scans:
        cache_file, masks = oracle_masks(
            catalogue[key], volumes, module, config.data.masks.min_voxels
        )
        before = len(load_masks(cache_file))
        save_masks(cache_file, masks, config.data.masks, source=f"oracle:{key}")
        cache_file.with_suffix(MASK_SIDECAR).unlink(missing_ok=True)
        rows.append(
            {"scan": key, "proposals": before, "oracle": len(masks), "cache_file": str(cache_file)}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Write the oracle cache and print what was replaced."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the pretraining run config (YAML)")
    parser.add_argument("--cache-dir", required=True, help="the oracle run's cache folder")
    parser.add_argument("--scans", nargs="+", required=True, help="catalogue keys to label")
    parser.add_argument("--data", default=None, help="data root")
    # Anything else is a pretrain override (--data.preprocessing.spacing [4,4,4], ...).
    args, extra = parser.parse_known_args(argv)
    run_args = ["--config", args.config, "--data.cache_dir", args.cache_dir, *extra]
    for row in write_oracle_cache(run_args, args.scans, args.data):
        print(f"{row['scan']}: {row['proposals']} proposals -> {row['oracle']} label masks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
