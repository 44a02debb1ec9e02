"""Label efficiency of tumour segmentation on BraTS (MASS claim ii): 1, 2 and 3 labelled cases.

    python -m omnienc.benchmarks.brats_labeleff --encoder checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/bench/brats_labeleff

The FPN decoder of :mod:`omnienc.adapters.segmentation` is trained on random crops of 1, 2 or 3
labelled BraTS cases (FLAIR input) and tested on the other cases, in seeded rotations
(:func:`~omnienc.benchmarks.brats_labeleff_cases.label_rotations`: no test case is ever in its
training set), for four methods on the same crops, seeds and steps:

* ``frozen``: the encoder under test, frozen, + decoder;
* ``finetune``: the encoder under test trained with the decoder (encoder lr 0.1x);
* ``scratch``: a random-init encoder of the same architecture trained with the decoder (encoder
  lr 1x, as the classification benchmark's supervised-from-scratch baseline);
* ``frozen_random``: that random-init encoder, frozen, + decoder (the floor).

One decoder predicts three nested classes (background, whole tumour outside the core, core);
whole tumour and tumour core are read back from them and scored by Dice on each test case's
native 1 mm grid (:mod:`~omnienc.benchmarks.brats_labeleff_cases`). Budget: a fixed number of
steps for every method and every number of cases, the CT segmentation benchmark's rule (the
classification benchmark's :class:`~omnienc.benchmarks.classification.EndToEndBudget`, 20
epochs of the labelled subset clamped to at least 200 steps, would give 1-3 volumes always its
minimum). Case files are preprocessed once and reused by every run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.adapters.classification import checkpoint_id, random_checkpoint_id
from omnienc.adapters.segmentation import SegDecoderConfig, train_segmentation
from omnienc.benchmarks.brats_labeleff_cases import (
    CLASS_NAMES,
    SCORED_REGIONS,
    SEQUENCE,
    label_rotations,
    native_dice,
    predict_native,
    prepare_cases,
)
from omnienc.benchmarks.brats_labeleff_report import (
    format_brats_label_efficiency_markdown,
    run_line,
    summarize,
    summary_metrics,
    write_brats_label_efficiency,
)
from omnienc.benchmarks.classification import EndToEndBudget
from omnienc.benchmarks.machine import cpu_seconds
from omnienc.benchmarks.report import machine_facts
from omnienc.benchmarks.segmentation import build_benchmark_encoder
from omnienc.checkpoint import file_sha256
from omnienc.data.brats import TUMOUR_REGIONS
from omnienc.data.root import resolve_data_root
from omnienc.encoders import arch_name, parse_random_spec, random_like
from omnienc.errors import OmniencError

METHODS = ("frozen", "finetune", "scratch", "frozen_random")
QUICK_METHODS = ("frozen", "frozen_random")
FROZEN = ("frozen", "frozen_random")
PRETRAINED = ("frozen", "finetune")
DEFAULT_ENCODER = Path("checkpoints/omnienc-cpu30min")
DEFAULT_OUT = Path("benchmarks/results/bench/brats_labeleff")


@dataclass(frozen=True)
class LabelEffPlan:
    """How much to run: numbers of labelled cases, rotations, and each decoder's training.

    Attributes:
        n_train: Numbers of labelled training cases (each below the number of cases).
        rotations: Rotations per number of cases (seeded; at most ``C(N, n)``).
        steps: Optimizer steps of every run (every method, every number of cases).
        batch_size: Crops per step.
        crop_size: Training crop and sliding window, voxels of the encoder's grid.
        width: Decoder width.
        lr: Decoder learning rate.
        encoder_lr_scale: Encoder learning rate of ``finetune``, a fraction of ``lr``.
        overlap: Sliding-window overlap at test time.
    """

    n_train: tuple[int, ...] = (1, 2, 3)
    rotations: int = 2
    steps: int = 150
    batch_size: int = 4
    crop_size: tuple[int, int, int] = (32, 32, 32)
    width: int = 16
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    overlap: float = 0.25


FULL_PLAN = LabelEffPlan()
QUICK_PLAN = LabelEffPlan(n_train=(1, 3), rotations=1, steps=100)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-run INFO lines (devices, tips, 'max_steps reached') silenced."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _encoder_identity(spec: str, encoder: Any, seed: int) -> dict[str, str]:
    parsed = parse_random_spec(spec)
    if parsed is not None:
        arch, spec_seed = parsed
        cid = random_checkpoint_id(arch, seed if spec_seed is None else spec_seed)
        return {"source": spec, "checkpoint": cid, "arch": arch}
    return {"source": spec, "checkpoint": checkpoint_id(spec), "arch": arch_name(encoder)}


def _command(
    spec: str, data_root: Path | None, quick: bool, methods: Any, steps: int | None, seed: int
) -> str:
    """The ``python -m`` line that runs the same job."""
    parts = ["python -m omnienc.benchmarks.brats_labeleff", "--encoder", spec]
    parts += ["--quick"] if quick else []
    parts += ["--methods", *methods] if methods else []
    parts += ["--steps", str(steps)] if steps is not None else []
    parts += ["--seed", str(seed)] if seed else []
    parts += ["--data", str(data_root)] if data_root is not None else []
    return " ".join(parts)


def run_brats_label_efficiency(
    encoder_spec: str,
    data_root: Path | None,
    *,
    quick: bool = False,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    seed: int = 0,
    steps: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train and test the decoder of every method on every rotation; the JSON-able payload.

    Args:
        encoder_spec: Exported checkpoint folder, or ``random:ARCH[:SEED]``.
        data_root: The data root (default :func:`~omnienc.data.root.resolve_data_root`).
        quick: :data:`QUICK_PLAN` (1 and 3 cases, one rotation each, fewer steps; methods
            default to :data:`QUICK_METHODS`) instead of :data:`FULL_PLAN`.
        methods: Subset of :data:`METHODS` (default: all; quick: :data:`QUICK_METHODS`).
        progress: One line per finished run.
        seed: Orders the rotations and seeds each run (``seed + rotation index``: decoder
            init, crops, the random-init encoder of ``scratch`` and ``frozen_random``).
        steps: Steps of every run (default: the plan's).
        command: The command to record (default: the equivalent ``python -m`` line).

    Returns:
        ``{"benchmark", "command", "encoder", "sequence", "classes", "regions", "dice_grid",
        "plan", "budget", "methods", "cases", "rotations", "runs", "summary", "machine",
        "seconds"}``.

    Raises:
        ValueError: Unknown methods.
        DataError: Fewer than two cases, or a case's labels are bad (see
            :func:`~omnienc.benchmarks.brats_labeleff_cases.prepare_case`).
        CheckpointError: The checkpoint cannot be loaded.
    """
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    chosen = [m for m in METHODS if m in (methods or (QUICK_METHODS if quick else METHODS))]
    plan = QUICK_PLAN if quick else FULL_PLAN
    plan = dataclasses.replace(plan, steps=steps) if steps is not None else plan
    budget = EndToEndBudget(steps=plan.steps)
    wall0, (busy0, own0) = time.perf_counter(), cpu_seconds()
    root = resolve_data_root(data_root)
    encoder, pre, _ = build_benchmark_encoder(encoder_spec, seed)
    identity = _encoder_identity(encoder_spec, encoder, seed)
    cases = prepare_cases(root, pre)
    by_name = {c.name: c for c in cases}
    prep_seconds = time.perf_counter() - wall0
    rotations = [
        rot
        for n in plan.n_train
        if n < len(cases)
        for rot in label_rotations(list(by_name), n, plan.rotations, seed)
    ]
    runs: list[dict[str, Any]] = []
    with _quiet_lightning():
        for rot in rotations:
            run_seed = seed + rot.index
            train_items = [by_name[n].item for n in rot.train]
            for method in chosen:
                enc = (
                    copy.deepcopy(encoder)
                    if method in PRETRAINED
                    else random_like(encoder, run_seed)  # the same draw for both baselines
                )
                config = SegDecoderConfig(
                    num_classes=len(CLASS_NAMES),
                    width=plan.width,
                    lr=plan.lr,
                    freeze_encoder=method in FROZEN,
                    encoder_lr_scale=plan.encoder_lr_scale if method == "finetune" else 1.0,
                    overlap=plan.overlap,
                )
                cpu0 = time.process_time()
                model, history = train_segmentation(
                    enc,
                    train_items,
                    None,
                    config,
                    plan.crop_size,
                    plan.steps,
                    batch_size=plan.batch_size,
                    seed=run_seed,
                )
                model.cpu()
                t0 = time.perf_counter()
                dice = {
                    n: native_dice(predict_native(model, by_name[n], plan.crop_size), by_name[n])
                    for n in rot.test
                }
                runs.append(
                    {
                        "method": method,
                        "n_train": rot.n_train,
                        "rotation": rot.index,
                        "seed": run_seed,
                        "train": list(rot.train),
                        "test": list(rot.test),
                        "dice": dice,
                        "final_loss": float(np.mean(history["loss"][-10:])),
                        "train_seconds": round(history["seconds"], 1),
                        "eval_seconds": round(time.perf_counter() - t0, 1),
                        "cpu_seconds": round(time.process_time() - cpu0, 1),
                    }
                )
                if progress:
                    print(run_line(runs[-1]), flush=True)
    busy, own = cpu_seconds()
    wall, busy, own = time.perf_counter() - wall0, busy - busy0, own - own0
    return {
        "benchmark": "brats_label_efficiency",
        "command": command or _command(encoder_spec, data_root, quick, methods, steps, seed),
        "quick": quick,
        "encoder": identity,
        "floor": f"random-init {identity['arch']} (seed {seed} + rotation index)",
        "sequence": SEQUENCE,
        "classes": list(CLASS_NAMES),
        "regions": {r: list(TUMOUR_REGIONS[r]) for r in SCORED_REGIONS},
        "dice_grid": "native (each test case's own 1 mm grid)",
        "preprocessing": pre.to_dict(),
        "plan": dataclasses.asdict(plan),
        "budget": {**dataclasses.asdict(budget), "text": budget.describe()},
        "methods": chosen,
        "seed": seed,
        "cases": [
            {
                "name": c.name,
                "preprocessed_shape": list(c.item.image.shape[1:]),
                "native_shape": list(c.native_classes.shape),
                "native_voxels": c.voxels(),
                "files": {k: file_sha256(p) for k, p in c.files.items()},
            }
            for c in cases
        ],
        "rotations": [dataclasses.asdict(r) for r in rotations],
        "runs": runs,
        "summary": summarize(runs, seed),
        "machine": machine_facts(),
        "seconds": {
            "prepare": round(prep_seconds, 1),
            "total": round(wall, 1),
            "own_cpu": round(own, 1),
            "machine_busy_cpu": round(busy, 1),
        },
    }


def add_brats_label_efficiency_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's options (``--encoder --quick --methods --steps --data --out -q --seed``)."""
    parser.add_argument(
        "--encoder",
        metavar="CKPT",
        help=f"exported encoder folder, or random:ARCH[:SEED] (default: {DEFAULT_ENCODER})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 and 3 cases, one rotation each, fewer steps, frozen encoders only (~2 min)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all four")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"steps of every run (default {FULL_PLAN.steps}; quick {QUICK_PLAN.steps})",
    )
    parser.add_argument("--data", type=Path, help="data root (default: $OMNIENC_DATA)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results path, no suffix")
    parser.add_argument("-q", "--quiet", action="store_true", help="no line per run")
    parser.add_argument("--seed", type=int, default=0, help="rotations and runs (default 0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the job, write ``OUT.json`` and ``OUT.md``, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m omnienc.benchmarks.brats_labeleff",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_brats_label_efficiency_arguments(parser)
    args = parser.parse_args(argv)
    encoder = args.encoder or str(DEFAULT_ENCODER)
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        payload = run_brats_label_efficiency(
            encoder,
            args.data,
            quick=args.quick,
            methods=args.methods,
            progress=not args.quiet,
            seed=args.seed,
            steps=args.steps,
            command="python -m omnienc.benchmarks.brats_labeleff " + " ".join(words),
        )
    except (OmniencError, ValueError) as e:
        print(f"brats_labeleff: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_brats_label_efficiency(payload, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


__all__ = [
    "FULL_PLAN",
    "METHODS",
    "QUICK_METHODS",
    "QUICK_PLAN",
    "LabelEffPlan",
    "add_brats_label_efficiency_arguments",
    "format_brats_label_efficiency_markdown",
    "main",
    "run_brats_label_efficiency",
    "summarize",
    "summary_metrics",
    "write_brats_label_efficiency",
]

if __name__ == "__main__":
    raise SystemExit(main())
