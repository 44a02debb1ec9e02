"""The pretext subcommands: ``omnienc masks`` and ``omnienc segment``, their arguments and runs.

``omnienc pretrain`` is parsed by :func:`omnienc.pretext.train.main` (jsonargparse: a YAML config
and dotted overrides), which :func:`omnienc.cli.command.main` calls before argparse.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omnienc.cli.common import (
    add_common_flags,
    add_crop_size_flag,
    add_shard_flag,
    crop_size_from_flag,
)


def cmd_masks(args: argparse.Namespace) -> int:
    """``omnienc masks DIR``: class-agnostic mask proposals for every volume, cached."""
    from omnienc.data.folder import VolumeFolder, default_cache_dir
    from omnienc.pretext.masks import MaskConfig, compute_folder_masks, format_mask_summary

    settings = None
    if args.config is not None:  # the run's preprocessing and mask config: its cache keys
        from omnienc.pretext.masks import read_mask_settings

        settings = read_mask_settings(args.config)
    cache_dir = args.cache_dir or (settings.cache_dir if settings else None) or default_cache_dir()
    overrides: dict[str, Any] = dict(settings.masks) if settings else {}
    if args.max_masks:
        overrides["max_masks"] = args.max_masks
    if args.sam2:  # MASS's generator alone: SAM2 on seed slices, propagated through the volume
        overrides.update(providers=("sam2",), sam2=args.sam2)
    folder = VolumeFolder(
        args.folder,
        settings.preprocessing if settings else None,
        cache_dir=cache_dir,
        frame=args.frame,
        progress=not args.quiet,
        shard=args.shard,
    )
    if args.shard is not None:
        print(f"shard {args.shard}: {len(folder.entries)} volumes of {args.folder}")
    results = compute_folder_masks(
        folder, MaskConfig(**overrides), cache_dir, workers=args.workers, progress=not args.quiet
    )
    print(format_mask_summary(results))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """``omnienc segment CKPT --support IMG MASK --query IMG -o OUT``."""
    from omnienc.pretext.segment import segment_files

    try:
        crop_size = crop_size_from_flag(args.crop_size)
    except ValueError as e:
        raise SystemExit(f"omnienc segment: {e}") from None
    out = segment_files(
        args.checkpoint,
        args.support[0],
        args.support[1],
        args.query,
        args.output,
        label=args.label,
        crop_size=crop_size,
    )
    print(f"wrote {out}")
    return 0


def masks_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc masks``'s arguments, the common flags among them."""
    p.add_argument("folder", type=Path, metavar="DIR")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--max-masks", type=int, help="cap per volume")
    p.add_argument(
        "--sam2",
        metavar="PATH_OR_ID",
        help="use the SAM2 provider with this checkpoint: a local folder or a hub id such as "
        "facebook/sam2.1-hiera-tiny (needs the weights; default: classical providers)",
    )
    add_shard_flag(p)
    p.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="a pretrain config: use its data.preprocessing, data.masks and data.cache_dir, so "
        "that `omnienc pretrain --config YAML` finds these masks in the cache",
    )
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    add_common_flags(p, cache="cache folder")
    p.set_defaults(func=cmd_masks)


def segment_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc segment``'s arguments, the common flags among them."""
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--support", nargs=2, type=Path, metavar=("IMG", "MASK"), required=True)
    p.add_argument("--query", type=Path, metavar="IMG", required=True)
    p.add_argument("--label", type=int, help="label value of MASK to use (default: MASK > 0)")
    add_crop_size_flag(
        p,
        "reference crop and window size in voxels of the checkpoint's spacing, one int or "
        "three (default: 192 mm, MASS's field of view: 96 at 2 mm; "
        "benchmarks/results/pretrain.md measures others)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output .nii.gz")
    add_common_flags(p)
    p.set_defaults(func=cmd_segment)
