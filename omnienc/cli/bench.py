"""``omnienc bench``: the benchmark suite -> JSON and Markdown tables under benchmarks/results/.

``classification``, ``segmentation``, ``all`` and ``medsegbench`` are parsed here; the jobs of
:data:`BENCH_JOBS` own their command lines (``omnienc bench NAME ARGS...`` runs the module's
``main(ARGS)``). The command line is the one place outside :mod:`omnienc.benchmarks` that
imports it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from omnienc.cli.common import add_common_flags


def cmd_bench_medsegbench(args: argparse.Namespace) -> int:
    """``omnienc bench medsegbench``: the segmentation decoder on a MedSegBench set."""
    from omnienc.benchmarks.medsegbench import format_medsegbench_markdown, run_medsegbench_suite
    from omnienc.benchmarks.report import command_line, machine_facts, write_report
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
    where = f"{machine['cpu']}, {machine['torch_threads']} torch threads, GPU: {machine['gpu']}"
    text = format_medsegbench_markdown(suite, suite["command"], where)
    write_report(out, suite, text, newline=True)
    print(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


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
        run_classification,
    )
    from omnienc.benchmarks.classification_report import write_results
    from omnienc.benchmarks.report import command_line, machine_facts
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
    from omnienc.benchmarks import brats_classify, brats_labeleff, fewshot
    from omnienc.benchmarks.report import command_line
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


def bench_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc bench``'s arguments, the common flags among them."""
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
        b.add_argument("--no-cache", action="store_true", help="do not cache features")
        add_common_flags(b, data=True, cache="feature cache")
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
    add_common_flags(b, data=True)
    b.set_defaults(func=cmd_bench_medsegbench)
