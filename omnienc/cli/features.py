"""The frozen-feature subcommands: ``omnienc embed``, ``omnienc probe`` and ``omnienc umap``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from omnienc import __version__
from omnienc.cli.common import add_common_flags, add_shard_flag, print_table


def cmd_embed(args: argparse.Namespace) -> int:
    """``omnienc embed CKPT INPUT... -o feats.npz`` (or ``--random ARCH INPUT...``)."""

    from omnienc.checkpoint import load_encoder
    from omnienc.data.root import resolve_data_root
    from omnienc.embed import MEDMNIST_PREFIX, embed_inputs
    from omnienc.encoders import random_encoder
    from omnienc.preprocessing import Preprocessing

    positionals = list(args.items)
    if args.random:
        encoder = random_encoder(args.random, args.seed)
        preprocessing = Preprocessing()
        source = f"random:{args.random} (seed {args.seed})"
        inputs = positionals
    else:
        if len(positionals) < 2:
            raise SystemExit("omnienc embed: give CKPT and at least one INPUT, or --random ARCH")
        encoder, preprocessing = load_encoder(positionals[0])
        source = str(positionals[0])
        inputs = positionals[1:]
    if not inputs:
        raise SystemExit("omnienc embed: give at least one INPUT")
    medmnist_root = None
    if any(i.startswith(MEDMNIST_PREFIX) for i in inputs):
        medmnist_root = resolve_data_root(args.data) / "medmnist"
    start = time.perf_counter()
    emb = embed_inputs(
        encoder,
        preprocessing,
        inputs,
        medmnist_root=medmnist_root,
        batch_size=args.batch_size,
        frame=args.frame,
        cache_dir=args.cache_dir,
        download=args.download,
        progress=not args.quiet,
        window=args.window,
        shard=args.shard,
    )
    seconds = time.perf_counter() - start
    emb.meta = {
        "encoder": source,
        "arch": getattr(encoder, "family", type(encoder).__name__),
        "embed_dim": int(encoder.embed_dim),
        "preprocessing": preprocessing.to_dict(),
        "window": args.window,
        "inputs": inputs,
        "seconds": round(seconds, 2),
        "omnienc": __version__,
        "shard": str(args.shard) if args.shard else None,
    }
    out = emb.save(args.shard.output_path(args.output) if args.shard else args.output)
    rows = []
    for spec in inputs:
        mask = np.asarray(emb.inputs) == spec
        n = int(mask.sum())
        feats = emb.features[mask]
        rows.append(
            [
                spec,
                str(n),
                str(emb.features.shape[1]),
                f"{float(feats.std(0).mean()):.3g}" if n > 1 else "-",
            ]
        )
    print_table(["input", "items", "dim", "mean feature std"], rows)
    print(f"wrote {out}: features {emb.features.shape} in {seconds:.1f} s with {source}")
    return 0


def _fmt_metric(result: Any, key: str) -> str:
    lo, hi = result.intervals.get(key, (float("nan"), float("nan")))
    return f"{result.metrics[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def cmd_probe(args: argparse.Namespace) -> int:
    """``omnienc probe CKPT --dataset FLAG``: linear probe on frozen features, with its floor."""

    from omnienc.adapters.classification import run_linear_probe
    from omnienc.checkpoint import load_encoder
    from omnienc.data.root import resolve_data_root
    from omnienc.encoders import random_encoder, random_like

    root = resolve_data_root(args.data) / "medmnist"
    runs: list[tuple[str, Any]] = []
    if args.random:
        encoder = random_encoder(args.random, args.seed)
        runs.append((f"random-init {args.random} (seed {args.seed})", encoder))
    else:
        if args.checkpoint is None:
            raise SystemExit("omnienc probe: give CKPT or --random ARCH")
        encoder, _ = load_encoder(args.checkpoint)
        runs.append((f"{args.checkpoint}", encoder))
        if not args.no_floor:
            floor = random_like(encoder, args.seed)
            runs.append((f"random-init, same shape (seed {args.seed}; the floor)", floor))
    rows, results = [], {}
    for name, encoder in runs:
        start = time.perf_counter()
        r = run_linear_probe(
            encoder,
            args.dataset,
            args.size,
            root,
            batch_size=args.batch_size,
            seed=args.seed,
            download=args.download,
            progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
        rows.append(
            [
                name,
                _fmt_metric(r, "acc"),
                _fmt_metric(r, "auc"),
                f"{r.metrics['f1']:.3f}",
                f"{r.metrics['balanced_acc']:.3f}",
                f"{r.params['C']:.3g}",
                f"{seconds:.0f}",
            ]
        )
        results[name] = {
            "metrics": r.metrics,
            "intervals": r.intervals,
            "params": r.params,
            "n": r.n,
            "seconds": round(seconds, 1),
        }
    print(
        f"linear probe, {args.dataset} {args.size}, test split "
        f"(C chosen on val AUC; 95% bootstrap intervals)"
    )
    print_table(["encoder", "ACC", "AUC", "F1", "bal.ACC", "C", "s"], rows)
    if args.json:
        from omnienc.atomic import write_bytes_atomic

        payload = {"dataset": args.dataset, "size": args.size, "results": results}
        write_bytes_atomic(args.json, json.dumps(payload, indent=2).encode())
    return 0


def cmd_umap(args: argparse.Namespace) -> int:
    """``omnienc umap CKPT INPUT... -o OUT``: latent maps (PNG, HTML, CSV) and their numbers."""
    from omnienc.adapters.latent import (
        LatentOptions,
        build_latent_map,
        check_inputs,
        comparison_rows,
        map_encoders,
        write_latent_map,
        write_summary,
    )
    from omnienc.data.root import resolve_data_root
    from omnienc.embed import MEDMNIST_PREFIX

    positionals = list(args.items)
    checkpoint = None if args.random else positionals.pop(0)
    if not positionals:
        raise SystemExit(
            "omnienc umap: give CKPT and at least one INPUT, or --random ARCH INPUT..."
        )
    medmnist_root = None
    if any(i.startswith(MEDMNIST_PREFIX) for i in positionals):
        medmnist_root = resolve_data_root(args.data) / "medmnist"
    check_inputs(positionals, medmnist_root, args.download)
    options = LatentOptions(
        max_per_input=args.max_per_input,
        crop_size=tuple(args.crop_size) if args.crop_size else None,
        min_voxels=args.min_voxels,
        n_neighbors=args.n_neighbors,
        min_dist=args.min_dist,
        seed=args.seed,
        batch_size=args.batch_size,
        frame=args.frame,
        cache_dir=args.cache_dir,
        download=args.download,
    )
    maps = []
    for enc in map_encoders(checkpoint, args.random, args.seed, floor=not args.no_floor):
        m = build_latent_map(enc, positionals, medmnist_root, options, progress=not args.quiet)
        paths = write_latent_map(m, args.output)
        print(f"{enc.tag}: {len(m.latent)} points -> " + ", ".join(str(p) for p in paths.values()))
        maps.append(m)
    command = "omnienc " + " ".join(args.argv)
    summary = write_summary(maps, args.output, command, positionals, options)
    print_table(*comparison_rows(maps))
    print(f"wrote {summary}")
    return 0


def _encoder_and_inputs(p: argparse.ArgumentParser, *, random: str, output: str) -> None:
    """``CKPT INPUT...`` (or ``--random ARCH INPUT...``) and ``-o OUT``, for embed and umap."""
    p.add_argument(
        "items",
        nargs="+",
        metavar="CKPT_OR_INPUT",
        help="CKPT then INPUTs; with --random, only INPUTs",
    )
    p.add_argument("--random", metavar="ARCH", help=random)
    p.add_argument("-o", "--output", type=Path, required=True, help=output)


def embed_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc embed``'s arguments, the common flags among them."""
    _encoder_and_inputs(p, random="use a random-init encoder (the floor)", output="output .npz")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--window",
        type=int,
        default=128,
        metavar="N",
        help="encode preprocessed grids larger than N voxels along an axis by sliding windows "
        "of N (bounds memory; default 128); 0 encodes every volume in one piece",
    )
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init encoder")
    add_shard_flag(p, " and write OUT.shard-K-of-N.npz")
    p.add_argument(
        "--download",
        action="store_true",
        help="let the medmnist package download missing files (needs internet)",
    )
    add_common_flags(p, data=True, cache="preprocessing cache")
    p.set_defaults(func=cmd_embed)


def probe_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc probe``'s arguments, the common flags among them."""
    p.add_argument("checkpoint", nargs="?", type=Path, metavar="CKPT", help="exported encoder")
    p.add_argument("--random", metavar="ARCH", help="probe a random-init encoder instead")
    p.add_argument("--dataset", default="adrenalmnist3d", help="MedMNIST flag")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--no-floor", action="store_true", help="skip the random-init comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--download", action="store_true", help="let medmnist download missing files")
    add_common_flags(p, data=True)
    p.set_defaults(func=cmd_probe)


def umap_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc umap``'s arguments, the common flags among them."""
    _encoder_and_inputs(p, random="map a random-init encoder only", output="output folder")
    p.add_argument("--no-floor", action="store_true", help="skip the random-init encoder")
    p.add_argument("--seed", type=int, default=0, help="UMAP, subsets, folds, random-init weights")
    p.add_argument("--max-per-input", type=int, metavar="N", help="random subset per input")
    p.add_argument(
        "--crop-size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="structure crop in preprocessed voxels (default: checkpoint's crop)",
    )
    p.add_argument("--min-voxels", type=int, default=100, help="smallest structure cropped")
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP neighbourhood")
    p.add_argument("--min-dist", type=float, default=0.1, help="UMAP min_dist")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.add_argument("--download", action="store_true", help="let medmnist download missing files")
    add_common_flags(p, data=True, cache="preprocessing cache")
    p.set_defaults(func=cmd_umap)
