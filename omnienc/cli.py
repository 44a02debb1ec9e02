"""The ``omnienc`` command. It only parses arguments; typed functions do the work.

Errors a user can fix (:class:`~omnienc.errors.OmniencError`) print one line naming the file and
the problem and exit with status 1; no library traceback reaches the user unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc import __version__
from omnienc.errors import OmniencError, PathError

logger = logging.getLogger("omnienc")


def _add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="data root with medmnist/ and volumes/ (default: $OMNIENC_DATA, else ../shared/data)",
    )


def _add_shard_arg(p: argparse.ArgumentParser, also: str = "") -> None:
    from omnienc.shard import shard_arg

    p.add_argument(
        "--shard",
        type=shard_arg,
        metavar="K/N",
        help=f"process only shard K of N (1-based, split by sorted relative path){also}",
    )


def _fmt_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain aligned text table to stdout."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    print(_fmt_row(header, widths))
    print(_fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(_fmt_row(r, widths))


def _fmt_tuple(t: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in t)


def cmd_info(args: argparse.Namespace) -> int:
    """``omnienc info PATH...``: shape, spacing, orientation, modality and range per volume."""
    from omnienc.io import read_volume

    header = ["path", "kind", "shape", "spacing (mm)", "orient.", "modality", "range"]
    rows: list[list[str]] = []
    pairs: list[Any] = []
    failures = 0
    for spec in args.paths:
        path = Path(spec)
        if path.is_dir() and not args.series:
            from omnienc.data.folder import VolumeFolder  # MONAI: seconds to import, folders only

            folder = VolumeFolder(
                path,
                cache_dir=args.cache_dir,
                include_labels=True,
                frame=args.frame,
                progress=not args.quiet,
            )
            for e in folder.manifest:
                rows.append(
                    [
                        e.source + (f" [{e.series_uid}]" if e.series_uid else ""),
                        e.kind,
                        _fmt_tuple(e.shape),
                        _fmt_tuple(e.spacing),
                        "RAS",
                        f"{e.modality} ({e.modality_source})",
                        f"{e.intensity[0]:.4g}..{e.intensity[1]:.4g}",
                    ]
                )
            for source, problem in folder.skipped:
                rows.append([source, "skipped", "-", "-", "-", "-", problem.split(": ", 1)[-1]])
            from omnienc.data.pairing import pair_label_maps

            pairs.extend(pair_label_maps(folder))
            print(folder.summary(), file=sys.stderr)
            continue
        try:
            v = read_volume(path, frame=args.frame)
        except OmniencError as exc:
            if len(args.paths) == 1:
                raise
            rows.append(
                [
                    str(path),
                    "error",
                    "-",
                    "-",
                    "-",
                    "-",
                    exc.problem if isinstance(exc, PathError) else str(exc),
                ]
            )
            failures += 1
            continue
        rows.append(
            [
                str(path),
                "volume",
                _fmt_tuple(v.shape),
                _fmt_tuple(v.spacing),
                v.orientation,
                f"{v.modality} ({v.modality_source})",
                f"{float(v.array.min()):.4g}..{float(v.array.max()):.4g}",
            ]
        )
    print_table(header, rows)
    if pairs:
        print()
        print_table(
            ["image", "label map (same folder, same grid)"],
            [[p.image_id, str(p.label)] for p in pairs],
        )
    return 1 if failures else 0


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


def cmd_export(args: argparse.Namespace) -> int:
    """``omnienc export CKPT OUT``: weights + config.json + model card, ready to publish."""
    from omnienc.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint, args.out, license=args.license, results=args.results, repo_id=args.repo_id
    )
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """``omnienc segment CKPT --support IMG MASK --query IMG -o OUT``."""
    from omnienc.pretext.segment import segment_files

    out = segment_files(
        args.checkpoint, args.support[0], args.support[1], args.query, args.output, label=args.label
    )
    print(f"wrote {out}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """``omnienc describe CKPT VOLUME --lm PATH [--projector DIR]``: print generated text."""
    from omnienc.adapters.language import describe

    result = describe(
        args.checkpoint, args.volume, args.lm, args.projector, args.max_new_tokens, args.frame
    )
    print(result.text)
    if result.templated:
        print(
            f"omnienc: note: projector {result.projector} was trained on templated text made "
            "from labels, not on radiology reports",
            file=sys.stderr,
        )
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


def cmd_bench_medsegbench(args: argparse.Namespace) -> int:
    """``omnienc bench medsegbench``: the segmentation decoder on a MedSegBench set."""
    from omnienc.atomic import write_bytes_atomic
    from omnienc.benchmarks.classification import command_line, machine_facts
    from omnienc.benchmarks.medsegbench import format_medsegbench_markdown, run_medsegbench_suite
    from omnienc.data.root import resolve_data_root

    encoder = args.encoder or str(SHIPPED_CHECKPOINT)
    if args.encoder is None and not SHIPPED_CHECKPOINT.is_dir():
        raise SystemExit(f"omnienc bench: give --encoder CKPT or random:ARCH (no {encoder} here)")
    root = args.root or resolve_data_root(args.data) / "medsegbench"
    suite = run_medsegbench_suite(
        encoder,
        args.dataset,
        args.size,
        floor=not args.no_floor,
        root=root,
        steps=args.steps,
        seeds=tuple(args.seeds),
        max_train=args.max_train,
        max_test=args.max_test,
        fine_tune=args.fine_tune,
        download=args.download,
        progress=not args.quiet,
    )
    machine = machine_facts()
    suite["machine"] = machine
    suite["command"] = command_line(args.argv)
    out = args.out or Path(f"benchmarks/results/bench/medsegbench_{args.dataset}_{args.size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f"{machine['cpu']}, {machine['torch_threads']} torch threads, GPU: {machine['gpu']}"
    text = format_medsegbench_markdown(suite, suite["command"], where)
    write_bytes_atomic(out.with_suffix(".json"), (json.dumps(suite, indent=2) + "\n").encode())
    write_bytes_atomic(out.with_suffix(".md"), text.encode())
    print(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``omnienc``."""
    parser = argparse.ArgumentParser(
        prog="omnienc",
        description="Self-supervised 3D representation learning for radiology.",
    )
    parser.add_argument("--version", action="version", version=f"omnienc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="describe volumes: shape, spacing, orientation, modality",
        description="Print each volume's shape, spacing, orientation, modality "
        "and intensity range; a folder prints its manifest. Exits 1 if a file given "
        "is unreadable (files skipped inside a folder only warn).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="volume files, DICOM or other folders")
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.add_argument(
        "--series",
        action="store_true",
        help="read a folder as one DICOM series instead of scanning it",
    )
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache (default ~/.cache/omnienc)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "embed",
        help="pooled features of volumes or MedMNIST splits -> .npz",
        description="Write frozen-encoder features (N, E), ids and labels to .npz. "
        "INPUT: a volume file, a folder, or medmnist:FLAG:SIZE:SPLIT.",
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="CKPT_OR_INPUT",
        help="CKPT then INPUTs; with --random, only INPUTs",
    )
    p.add_argument("--random", metavar="ARCH", help="use a random-init encoder (the floor)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .npz")
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
    _add_shard_arg(p, " and write OUT.shard-K-of-N.npz")
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache (default ~/.cache/omnienc)")
    p.add_argument(
        "--download",
        action="store_true",
        help="let the medmnist package download missing files (needs internet)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_data_arg(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "probe",
        help="linear probe of frozen features on a MedMNIST set",
        description="Extract frozen features of the train/val/test splits, fit a "
        "logistic regression (C chosen on val AUC) and report test ACC/AUC/F1 with "
        "bootstrap 95%% intervals, beside a random-init encoder of the same shape.",
    )
    p.add_argument("checkpoint", nargs="?", type=Path, metavar="CKPT", help="exported encoder")
    p.add_argument("--random", metavar="ARCH", help="probe a random-init encoder instead")
    p.add_argument("--dataset", default="adrenalmnist3d", help="MedMNIST flag")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--no-floor", action="store_true", help="skip the random-init comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--download", action="store_true", help="let medmnist download missing files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_data_arg(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "bench",
        help="the benchmark suite: probes, baselines, label efficiency -> results tables",
        description="Run frozen probes (linear, kNN, attention head) of an encoder and of a "
        "random-init encoder of the same shape, supervised-from-scratch and fine-tuning "
        "baselines, at several fractions of the training labels; write JSON + Markdown.",
    )
    bench = p.add_subparsers(
        dest="bench_command",
        required=True,
        metavar="{classification,segmentation,all,medsegbench," + ",".join(BENCH_JOBS) + "}",
    )
    for name, (_, text) in BENCH_JOBS.items():
        # Parsed by the job's own main (see `main`); listed here for `omnienc bench --help`.
        bench.add_parser(name, help=text, add_help=False)
    for name, text in (
        ("classification", "one MedMNIST set"),
        ("segmentation", "decoder on one labelled CT, Dice on another"),
        (
            "all",
            "everything here: MedMNIST sets (AdrenalMNIST3D 28 and 64, BreastMNIST 28, "
            "RetinaMNIST 28), CT segmentation, few-shot, BraTS classification and label "
            "efficiency, and the suite summary",
        ),
    ):
        b = bench.add_parser(name, help=text, description=f"Benchmark: {text}.")
        b.add_argument(
            "--encoder",
            metavar="CKPT",
            help="exported encoder folder, or random:ARCH[:SEED] "
            f"(default: {SHIPPED_CHECKPOINT} when it exists)",
        )
        if name == "classification":
            b.add_argument("--dataset", default="adrenalmnist3d", help="any MedMNIST flag")
            b.add_argument("--size", type=int, default=28)
        if name in ("segmentation", "all"):
            b.add_argument("--seg-steps", type=int, default=300, help="segmentation steps per run")
            b.add_argument(
                "--seg-seeds",
                nargs="+",
                type=int,
                default=[0, 1] if name == "all" else [0, 1, 2],
                help="segmentation seeds (default: 0 1 2; 0 1 in `all`, for its time budget)",
            )
            b.add_argument(
                "--seg-frozen-only",
                action="store_true",
                help="skip the end-to-end segmentation runs (fine-tuning, from scratch)",
            )
        b.add_argument(
            "--methods", nargs="+", help="subset of linear knn attention scratch finetune"
        )
        b.add_argument("--fractions", nargs="+", type=float, help="default: 0.01 0.1 1")
        b.add_argument("--head-seeds", nargs="+", type=int, default=[0, 1, 2])
        b.add_argument(
            "--epochs",
            type=float,
            default=20.0,
            help="end-to-end budget: passes over the labelled subset (default 20), clamped to "
            "--min-steps..--max-steps",
        )
        b.add_argument("--min-steps", type=int, default=200, help="default 200")
        b.add_argument("--max-steps", type=int, default=1000, help="default 1000")
        b.add_argument("--steps", type=int, help="a fixed end-to-end budget for every fraction")
        b.add_argument("--encoder-lr-scale", type=float, default=0.1, help="for fine-tuning")
        b.add_argument("--no-floor", action="store_true", help="skip the random-init encoder")
        b.add_argument("--out", type=Path, help="results path without suffix")
        b.add_argument("--cache-dir", type=Path, help="feature cache (default ~/.cache/omnienc)")
        b.add_argument("--no-cache", action="store_true", help="do not cache features")
        b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        _add_data_arg(b)
        b.set_defaults(func=cmd_bench)
    b = bench.add_parser(
        "medsegbench",
        help="segmentation decoder on a MedSegBench set (files from the medsegbench package)",
        description="Benchmark: train the segmentation decoder on a MedSegBench set's training "
        "images (frozen encoder, and its random-init floor), Dice per class on its test images.",
    )
    b.add_argument("--encoder", metavar="CKPT", help="exported encoder folder, or random:ARCH")
    b.add_argument("--dataset", required=True, help="MedSegBench flag, e.g. busi or kvasir")
    b.add_argument("--size", type=int, default=128, help="128, 256 or 512 (default 128)")
    b.add_argument("--root", type=Path, help="folder of the .npz files (default DATA/medsegbench)")
    b.add_argument("--steps", type=int, default=300, help="decoder steps per run (default 300)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    b.add_argument("--max-train", type=int, default=500, help="training images used (seeded)")
    b.add_argument("--max-test", type=int, help="test images scored (default: all)")
    b.add_argument("--fine-tune", action="store_true", help="also fine-tune the encoder")
    b.add_argument("--no-floor", action="store_true", help="skip the random-init encoder")
    b.add_argument("--download", action="store_true", help="let medsegbench download the file")
    b.add_argument("--out", type=Path, help="results path without suffix")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_data_arg(b)
    b.set_defaults(func=cmd_bench_medsegbench)

    p = sub.add_parser(
        "pretrain",
        help="pretrain the shared encoder (Lightning)",
        add_help=False,
        description="See `omnienc pretrain --help`.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)  # handled in main() before argparse

    p = sub.add_parser(
        "masks",
        help="class-agnostic mask proposals for a folder (cached)",
        description="Compute and cache mask proposals for every volume in DIR.",
    )
    p.add_argument("folder", type=Path, metavar="DIR")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--max-masks", type=int, help="cap per volume")
    p.add_argument(
        "--sam2",
        metavar="PATH_OR_ID",
        help="use the SAM2 provider with this checkpoint: a local folder or a hub id such as "
        "facebook/sam2.1-hiera-tiny (needs the weights; default: classical providers)",
    )
    _add_shard_arg(p)
    p.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="a pretrain config: use its data.preprocessing, data.masks and data.cache_dir, so "
        "that `omnienc pretrain --config YAML` finds these masks in the cache",
    )
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default ~/.cache/omnienc)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser(
        "export",
        help="a checkpoint as a folder to publish: safetensors, config.json, model card",
        description="Copy the checkpoint's weights and config.json into OUT (atomically) and "
        "write a model card README.md with Hugging Face metadata, the recipe, the pretraining "
        "data (from the run's config.yaml beside CKPT) and the numbers of --results files.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or hf-hub:ORG/NAME[@REV]")
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write")
    p.add_argument("--license", default="other", help="license id for the card (default: other)")
    p.add_argument(
        "--results",
        nargs="+",
        type=Path,
        default=[],
        metavar="JSON",
        help="results files written by `omnienc bench` (benchmarks/results/bench/*.json)",
    )
    p.add_argument("--repo-id", metavar="ORG/NAME", help="Hub id it will be published under")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "segment",
        help="few-shot in-context segmentation of a query volume",
        description="Segment in QUERY the structure that MASK marks in the support "
        "IMG, with the pretrained in-context head; output on the query's grid.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--support", nargs=2, type=Path, metavar=("IMG", "MASK"), required=True)
    p.add_argument("--query", type=Path, metavar="IMG", required=True)
    p.add_argument("--label", type=int, help="label value of MASK to use (default: MASK > 0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .nii.gz")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "align",
        help="train a projector from the frozen encoder into a causal LM (Lightning)",
        add_help=False,
        description="See `omnienc align --help`.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)  # handled in main() before argparse

    p = sub.add_parser(
        "describe",
        help="generate text for a volume through an aligned projector and LM",
        description="Encode VOLUME with the frozen encoder CKPT, project it into the language "
        "model's input space and print the LM's greedy text. The projector defaults to the "
        "projector/ folder beside CKPT (as `omnienc align` writes it).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="encoder folder (or random:ARCH[:SEED])")
    p.add_argument("volume", type=Path, metavar="VOLUME", help="volume file or DICOM folder")
    p.add_argument("--lm", type=Path, required=True, metavar="PATH", help="the aligned LM folder")
    p.add_argument("--projector", type=Path, metavar="DIR", help="projector folder")
    p.add_argument("--max-new-tokens", type=int, help="longest text (default: the projector's)")
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser(
        "umap",
        help="latent-space map of mixed inputs: PNG, interactive HTML, CSV + measured structure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed mixed inputs with a frozen encoder (and, by default, a random-init "
        "encoder of the same shape), map them to 2D with a seeded UMAP (cosine distance on "
        "centred features) and write, per encoder, OUT/TAG.png (coloured by modality, dataset, "
        "label and organ group), OUT/TAG.html (self-contained; hover shows the source file) and "
        "OUT/TAG.csv (2D coordinates with ids), plus OUT/metrics.json: silhouette per colouring "
        "(features and 2D), cross-validated kNN accuracy, and trustworthiness of the map.\n\n"
        "INPUT is one of:\n"
        "  a volume file or a folder of volumes (scanned recursively, DICOM by series)\n"
        "  medmnist:FLAG:SIZE:SPLIT       e.g. medmnist:adrenalmnist3d:28:test\n"
        "  structures:IMAGE:LABELS[:NAME] one crop (--crop-size) around each structure of the\n"
        "                                 label map LABELS (same grid as IMAGE) with at least\n"
        "                                 --min-voxels voxels; label = TotalSegmentator name\n"
        "                                 of its id, or NAME for every structure of a binary\n"
        "                                 mask, or 'label K' with NAME = ids (other label maps)\n"
        "  (paths in structures: specs may not contain ':')\n\n"
        "example:\n"
        "  omnienc umap checkpoints/omnienc-cpu30min ../shared/data/volumes \\\n"
        "    structures:../shared/data/volumes/totalsegmentator/example_ct_sm.nii.gz:"
        "../shared/data/volumes/totalsegmentator/example_seg.nii.gz \\\n"
        "    medmnist:adrenalmnist3d:28:test --max-per-input 200 -o runs/umap",
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="CKPT_OR_INPUT",
        help="CKPT then INPUTs; with --random, only INPUTs",
    )
    p.add_argument("--random", metavar="ARCH", help="map a random-init encoder only")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
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
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache (default ~/.cache/omnienc)")
    p.add_argument("--download", action="store_true", help="let medmnist download missing files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_data_arg(p)
    p.set_defaults(func=cmd_umap)
    return parser


BENCH_ALL = (
    # (flag, size, methods, fractions): the whole suite on the 28^3 / 28x28 sets; AdrenalMNIST3D
    # at 64^3 gets the frozen linear and kNN probes at 100% only, to stay inside the CPU budget.
    ("adrenalmnist3d", 28, None, None),
    ("breastmnist", 28, None, None),
    ("adrenalmnist3d", 64, ("linear", "knn"), (1.0,)),
    # RetinaMNIST (multi-class): the frozen probes only, at every fraction (1.5 min).
    ("retinamnist", 28, ("linear", "knn", "attention"), None),
)
SHIPPED_CHECKPOINT = Path("checkpoints/omnienc-cpu30min")
# Benchmarks that own their command line: `omnienc bench NAME ARGS...` runs MODULE.main(ARGS).
BENCH_JOBS = {
    "fewshot": (
        "omnienc.benchmarks.fewshot",
        "few-shot in-context segmentation across scans, beside registration and prototypes",
    ),
    "brats-classify": (
        "omnienc.benchmarks.brats_classify",
        "BraTS tumour vs tumour-free crops, leave-one-case-out frozen probe",
    ),
    "brats-labeleff": (
        "omnienc.benchmarks.brats_labeleff",
        "BraTS segmentation decoder from 1, 2 and 3 labelled cases",
    ),
    "summary": (
        "omnienc.benchmarks.suite",
        "the suite on one or more encoders: one table each, seed spread, the noise rule",
    ),
}


def cmd_bench(args: argparse.Namespace) -> int:
    """``omnienc bench classification|all``: the benchmark suite -> JSON + Markdown tables."""
    from omnienc.adapters.classification import FinetuneConfig
    from omnienc.benchmarks.classification import (
        DEFAULT_FRACTIONS,
        METHODS,
        EndToEndBudget,
        command_line,
        machine_facts,
        run_classification,
        write_results,
    )
    from omnienc.data.folder import default_cache_dir
    from omnienc.data.root import resolve_data_root

    root = resolve_data_root(args.data) / "medmnist"
    encoder = args.encoder
    if encoder is None:
        if not SHIPPED_CHECKPOINT.is_dir():
            raise SystemExit(
                f"omnienc bench: give --encoder CKPT or random:ARCH (no {SHIPPED_CHECKPOINT} here)"
            )
        encoder = str(SHIPPED_CHECKPOINT)
    finetune = FinetuneConfig(encoder_lr_scale=args.encoder_lr_scale)
    budget = EndToEndBudget(args.epochs, args.min_steps, args.max_steps, args.steps)
    segmentation = None
    if args.bench_command in ("segmentation", "all"):
        from omnienc.benchmarks.segmentation import run_segmentation_suite

        segmentation = run_segmentation_suite(
            encoder,
            floor=not args.no_floor,
            seeds=tuple(args.seg_seeds),
            steps=args.seg_steps,
            fine_tune=not args.seg_frozen_only,
            data_root=args.data,
            progress=not args.quiet,
        )
        segmentation["machine"] = machine_facts()
    if args.bench_command == "segmentation":
        jobs = []
        default_out = Path("benchmarks/results/bench/segmentation")
    elif args.bench_command == "classification":
        jobs = [(args.dataset, args.size, args.methods, args.fractions)]
        default_out = Path(f"benchmarks/results/bench/classification_{args.dataset}_{args.size}")
    else:
        jobs = list(BENCH_ALL)
        default_out = Path("benchmarks/results/bench/all")
    machine = machine_facts()
    payloads = []
    for flag, size, methods, fractions in jobs:
        payload = run_classification(
            flag,
            size,
            encoder,
            medmnist_root=root,
            fractions=tuple(fractions or args.fractions or DEFAULT_FRACTIONS),
            methods=tuple(methods or args.methods or METHODS),
            head_seeds=tuple(args.head_seeds),
            finetune=finetune,
            budget=budget,
            floor=not args.no_floor,
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
            progress=not args.quiet,
        )
        payload["machine"] = machine
        payloads.append(payload)
    out = args.out or default_out
    json_path, md_path = write_results(payloads, out, command_line(args.argv), segmentation)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if args.bench_command == "all":
        _bench_all_rest(args, encoder, payloads, segmentation, out)
    return 0


def _bench_all_rest(
    args: argparse.Namespace,
    encoder: str,
    payloads: list[Any],
    segmentation: Any,
    out: Path,
) -> None:
    """``bench all`` after the MedMNIST and CT jobs: few-shot, BraTS, and the suite summary.

    Each job writes its own results beside ``out`` (``fewshot``, ``brats_classify``,
    ``brats_labeleff``), and the summary of them all goes to ``OUT_summary.{json,md}``.
    """
    import time

    from omnienc.benchmarks import brats_classify, brats_labeleff, fewshot
    from omnienc.benchmarks.classification import command_line
    from omnienc.benchmarks.suite import summary_of_bench_all
    from omnienc.benchmarks.summary import write_summary

    start = time.perf_counter()
    command = command_line(args.argv)
    progress = not args.quiet
    few = fewshot.run_fewshot(encoder, args.data, progress=progress)
    few["command"] = command
    fewshot.write_fewshot(few, out.parent / "fewshot")
    cls = brats_classify.run_brats_classification(
        encoder, args.data, progress=progress, command=command
    )
    brats_classify.write_brats_classification(cls, out.parent / "brats_classify")
    eff = brats_labeleff.run_brats_label_efficiency(
        encoder, args.data, progress=progress, command=command
    )
    brats_labeleff.write_brats_label_efficiency(eff, out.parent / "brats_labeleff")
    seconds = sum(float(p.get("seconds", 0.0)) for p in payloads)
    seconds += float(segmentation["seconds"]) if segmentation else 0.0
    summary = summary_of_bench_all(
        encoder, payloads, segmentation, few, cls, eff, seconds + time.perf_counter() - start
    )
    json_path, md_path = write_summary([summary], out.parent / f"{out.name}_summary", command)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} (and the fewshot, brats_* results beside them)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omnienc`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain"] or argv[:2] == ["--debug", "pretrain"]:
        # jsonargparse owns everything after `pretrain` (dotted overrides, --config files).
        debug = argv[0] == "--debug"
        logging.basicConfig(level=logging.INFO, format="omnienc: %(levelname)s: %(message)s")
        from omnienc.pretext.train import main as pretrain_main

        rest = argv[2:] if debug else argv[1:]
        return _report_errors(lambda: pretrain_main(rest), debug, "omnienc pretrain")
    if argv[:1] == ["align"] or argv[:2] == ["--debug", "align"]:
        # jsonargparse owns everything after `align`, as for `pretrain`.
        debug = argv[0] == "--debug"
        logging.basicConfig(level=logging.INFO, format="omnienc: %(levelname)s: %(message)s")
        from omnienc.adapters.language.alignment import main as align_main

        rest = argv[2:] if debug else argv[1:]
        return _report_errors(lambda: align_main(rest), debug, "omnienc align")
    lead = 2 if argv[:1] == ["--debug"] else 1
    if argv[lead - 1 : lead] == ["bench"] and argv[lead : lead + 1] and argv[lead] in BENCH_JOBS:
        # These jobs parse their own arguments, as `pretrain` does.
        import importlib

        job = importlib.import_module(BENCH_JOBS[argv[lead]][0])
        rest = argv[lead + 1 :]
        return _report_errors(lambda: int(job.main(rest)), lead == 2, f"omnienc bench {argv[lead]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for results files
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="omnienc: %(levelname)s: %(message)s",
    )
    return _report_errors(lambda: int(args.func(args)), args.debug)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(text: str) -> str:
    """``text`` with its lines joined and terminal escapes removed: an error is one line."""
    return " ".join(ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip())


def _report_errors(run: Callable[[], int], debug: bool, prog: str = "omnienc") -> int:
    """Run a command; print a user-fixable error in one line (no traceback unless ``debug``)."""
    try:
        return int(run())
    except OmniencError as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        if debug:
            raise
        print(
            f"{prog}: error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
