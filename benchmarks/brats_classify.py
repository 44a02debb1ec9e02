"""Frozen classification of an unseen pathology: BraTS tumour vs tumour-free brain crops.

    python -m omnienc.benchmarks.brats_classify --encoder checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/bench/brats_classify

MASS (https://arxiv.org/abs/2603.13660) claims that its frozen encoder, pretrained without
labels, tells pathology it never saw from healthy tissue. Here: from each of the four BraTS 2013
cases (FLAIR and T1c, :mod:`omnienc.data.brats`), crops of the encoder's crop size on its own
preprocessed grid (capped at :data:`MAX_CROP_MM` per axis: a crop of a coarse-grid encoder that
spans most of a 140 mm brain has no tumour-free position), half centred in the whole tumour
and half in tumour-free brain (:mod:`.brats_crops`), are classified leave-one-case-out:
trained on three cases' crops, tested on the fourth's (:mod:`.brats_loco`). Methods, per
sequence:

* ``linear``: logistic regression on the frozen encoder's pooled embedding, for the encoder
  under test and for random-init encoders of the same shape (the floor, several seeds);
* ``scratch``: the same architecture trained end-to-end with the labels from random init, under
  a fixed budget (:class:`~.brats_loco.ScratchBudget`);
* ``intensity``: logistic regression on intensity statistics of the crop and of its centre,
  the first thing a researcher would try (FLAIR tumour and oedema are bright);

and once, the brain fraction of each crop alone: how much of a shortcut the sampling leaves to
a classifier that only counts background. The brain lesions of ``volumes/pyradiomics`` are
counted by the same rules (:func:`.brats_crops.lesion_crop_count`); they give too few crops to
evaluate.
The report and the summary numbers are in :mod:`.brats_classify_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.adapters.classification import extract_features
from omnienc.benchmarks.brats_budget import (
    BUDGET_OPTIONS,
    FULL_BUDGET,
    QUICK_BUDGET,
    BratsBudget,
    budget_from_options,
    budget_options,
)
from omnienc.benchmarks.brats_classify_report import (
    case_facts,
    data_files,
    format_brats_classification_markdown,
    summary_metrics,
    write_brats_classification,
)
from omnienc.benchmarks.brats_crops import (
    DEFAULT_CROP,
    CropSampling,
    cut_crops,
    lesion_counts,
    prepare_case,
    sample_case_crops,
)
from omnienc.benchmarks.brats_loco import (
    CropItems,
    intensity_features,
    probe_loco,
    scratch_loco,
    summarise,
)
from omnienc.benchmarks.classification import EncoderUnderTest, floor_of, resolve_encoder
from omnienc.benchmarks.machine import cpu_seconds, load_average
from omnienc.benchmarks.report import machine_facts
from omnienc.checkpoint import load_checkpoint_config
from omnienc.data.brats import find_brats_cases
from omnienc.data.root import resolve_data_root
from omnienc.encoders import random_like
from omnienc.preprocessing import Preprocessing

__all__ = [
    "FULL_BUDGET",
    "QUICK_BUDGET",
    "BratsBudget",
    "add_brats_classification_arguments",
    "budget_from_args",
    "format_brats_classification_markdown",
    "main",
    "run_brats_classification",
    "summary_metrics",
    "write_brats_classification",
]

SEQUENCES = ("flair", "t1c")
PYRADIOMICS = ("brain1", "brain2")  # pyradiomics/NAME_image.nrrd + NAME_label.nrrd
MODULE = "python -m omnienc.benchmarks.brats_classify"
DEFAULT_OUT = Path("benchmarks/results/bench/brats_classify")


# The largest crop side in mm: 32 voxels at the shipped 2 mm. An encoder pretrained on a
# coarser grid (4 mm: 32 voxels = 128 mm) gets crops of this physical size (16 voxels), so
# every encoder is asked the same question about the same tissue.
MAX_CROP_MM = 64.0
MIN_CROP = 16
# The grid the budget's distances are stated on (the shipped checkpoints' spacing).
REFERENCE_MM = 2.0


def encoder_setup(spec: str | Path) -> tuple[EncoderUnderTest, Preprocessing, tuple[int, ...]]:
    """The encoder, its preprocessing and its crop size.

    The crop is ``meta["crop_size"]`` (else 32^3), each side capped at :data:`MAX_CROP_MM` on
    the encoder's grid (and at least :data:`MIN_CROP` voxels); the shipped 2 mm checkpoints
    keep their 32^3.
    """
    under_test = resolve_encoder(spec)
    if under_test.is_random:
        return under_test, Preprocessing(), DEFAULT_CROP
    config = load_checkpoint_config(spec)
    crop = (config.get("meta") or {}).get("crop_size") or DEFAULT_CROP
    pre = Preprocessing.from_dict(config["preprocessing"])
    spacing = pre.spacing or (1.0, 1.0, 1.0)
    capped = tuple(
        max(MIN_CROP, min(int(c), int(MAX_CROP_MM // s)))
        for c, s in zip(crop, spacing, strict=True)
    )
    return under_test, pre, capped


def default_command(
    encoder_spec: str | Path,
    data_root: Path | None,
    quick: bool,
    seed: int,
    budget: BratsBudget,
    sequences: Sequence[str] = SEQUENCES,
) -> str:
    """The standalone command of a run: budget values that differ from the mode's as options.

    Seeds are written as counts (``--floor-seeds 3`` is seeds 0, 1, 2).
    """
    args = ["--encoder", str(encoder_spec)]
    args += ["--data", str(data_root)] if data_root is not None else []
    args += ["--quick"] if quick else []
    args += ["--seed", str(seed)] if seed else []
    args += ["--sequences", *sequences] if tuple(sequences) != SEQUENCES else []
    base = budget_options(QUICK_BUDGET if quick else FULL_BUDGET)
    for k, v in budget_options(budget).items():
        if v != base[k]:
            args += ["--" + k.replace("_", "-"), f"{v:g}"]
    return f"{MODULE} {shlex.join(args)}"


def run_brats_classification(
    encoder_spec: str | Path,
    data_root: Path | None,
    *,
    quick: bool = False,
    progress: bool = True,
    seed: int = 0,
    budget: BratsBudget | None = None,
    sequences: Sequence[str] = SEQUENCES,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return the JSON-able payload.

    Args:
        encoder_spec: Exported checkpoint folder, or ``random:ARCH[:SEED]``.
        data_root: The data root (default :func:`~omnienc.data.root.resolve_data_root`).
        quick: Fewer crops, one floor seed, a shorter from-scratch budget (:data:`QUICK_BUDGET`).
        progress: Progress bars and one line per finished row.
        seed: Seeds the crop draw, the probes' solver and the bootstrap (the encoders' seeds are
            the budget's ``floor_seeds`` and ``scratch_seeds``).
        budget: Replaces the mode's budget.
        sequences: BraTS sequences, one set of rows each.
        command: The command to record (default: the equivalent standalone command).
        log: Called with each row's line (default ``print`` when ``progress``).

    Returns:
        ``{"benchmark", "command", "encoder", "floor", "preprocessing", "sampling", "budget",
        "cases", "rows", "confound", "pyradiomics", "data_files", "machine", "seconds", ...}``;
        a row is ``{"sequence", "encoder", "method", "auc", "interval", "spread", "seed_aucs",
        "fold_aucs", "seconds", ...}``.

    Raises:
        DataError: No BraTS case, a bad case (grids, labels), or too few crops of a class.
        CheckpointError: The encoder folder is not a loadable checkpoint.
    """
    start = time.perf_counter()
    budget = budget or (QUICK_BUDGET if quick else FULL_BUDGET)
    emit = log or (print if progress else (lambda _line: None))
    load_start, cpu_start = load_average(), cpu_seconds()
    under_test, pre, crop_size = encoder_setup(encoder_spec)
    grid_mm = min(pre.spacing) if pre.spacing else REFERENCE_MM
    sampling = CropSampling(
        crop_size=crop_size,
        per_class=budget.per_class,
        min_distance=budget.min_distance * REFERENCE_MM / grid_mm,
        min_brain_fraction=budget.min_brain_fraction,
        seed=seed,
    )
    root = resolve_data_root(data_root)
    prepared = [prepare_case(case, pre, tuple(sequences)) for case in find_brats_cases(root)]
    drawn = [sample_case_crops(p, sampling) for p in prepared]
    y = np.concatenate([d.labels for d in drawn])
    cases = np.concatenate([[d.case] * len(d.labels) for d in drawn])
    ids = [f"{d.case}:{'x'.join(map(str, c))}" for d in drawn for c in d.centres]
    seconds = {"prepare": time.perf_counter() - start, "features": 0.0, "probes": 0.0}
    seconds["scratch"] = 0.0
    label = "random-init" if under_test.is_random else "pretrained"
    encoders = [(label, [under_test])]
    if not under_test.is_random:
        encoders.append(("random-init", [floor_of(under_test, s) for s in budget.floor_seeds]))
    rows: list[dict[str, Any]] = []

    def add(seq: str, encoder: str, method: str, scores: list[np.ndarray], **extra: Any) -> None:
        summary = summarise(scores, y, cases, budget.n_boot, seed)
        rows.append({"sequence": seq, "encoder": encoder, "method": method, **summary, **extra})
        lo, hi = summary["interval"]
        emit(f"brats {seq} | {encoder} {method}: AUC {summary['auc']:.3f} [{lo:.3f}, {hi:.3f}]")

    for seq in sequences:
        pairs = zip(prepared, drawn, strict=True)
        crops = np.concatenate([cut_crops(p.images[seq], d.centres, crop_size) for p, d in pairs])
        for enc_label, suts in encoders:
            t0 = time.perf_counter()
            feats = [
                extract_features(
                    s.encoder,
                    CropItems(crops, ids),
                    checkpoint_id=s.checkpoint,
                    progress=progress,
                    name=f"brats:{seq}:{s.checkpoint[:19]}",
                ).features
                for s in suts
            ]
            t1 = time.perf_counter()
            fits = [probe_loco(f, y, cases, seed=seed) for f in feats]
            seconds["features"] += t1 - t0
            seconds["probes"] += time.perf_counter() - t1
            add(seq, enc_label, "linear", [s for s, _ in fits], params=[p for _, p in fits])
        t0 = time.perf_counter()
        scores, params = probe_loco(intensity_features(crops), y, cases, seed=seed)
        seconds["probes"] += time.perf_counter() - t0
        add(seq, "–", "intensity", [scores], params=[params])
        t0 = time.perf_counter()
        scratch = [
            scratch_loco(
                lambda s=s: random_like(under_test.encoder, s), crops, y, cases, budget.scratch, s
            )
            for s in budget.scratch_seeds
        ]
        seconds["scratch"] += time.perf_counter() - t0
        add(seq, "random-init", "scratch", scratch, seeds=list(budget.scratch_seeds))
    brain_fraction = np.concatenate([d.brain_fraction for d in drawn])[:, None]
    confound_scores, confound_params = probe_loco(brain_fraction, y, cases, seed=seed)
    confound = summarise([confound_scores], y, cases, budget.n_boot, seed)
    pyradiomics = lesion_counts(root / "volumes" / "pyradiomics", PYRADIOMICS, pre, sampling)
    extra = [
        root / "volumes" / "pyradiomics" / f"{name}_{kind}.nrrd"
        for name in pyradiomics["cases"]
        for kind in ("image", "label")
    ]
    seconds["total"] = time.perf_counter() - start
    busy, own = (end - begin for end, begin in zip(cpu_seconds(), cpu_start, strict=True))
    seconds["process_cpu"], seconds["others_cpu"] = own, max(0.0, busy - own)
    return {
        "benchmark": "brats_classify",
        "command": command
        or default_command(encoder_spec, data_root, quick, seed, budget, sequences),
        "quick": quick,
        "seed": seed,
        "encoder": {
            "source": under_test.source,
            "checkpoint": under_test.checkpoint,
            "arch": under_test.arch,
            "label": label,
        },
        "floor": [s.checkpoint for s in encoders[1][1]] if len(encoders) > 1 else [],
        "preprocessing": pre.to_dict(),
        "sequences": list(sequences),
        "sampling": dataclasses.asdict(sampling),
        "budget": dataclasses.asdict(budget),
        "bootstrap": f"{budget.n_boot} replicates; crops resampled within each (case, class)",
        "probe": "logistic regression on standardised features; C from 1e-4..1e2 (x10) by "
        "leave-one-case-out cross-validation within the 3 training cases",
        "cases": [case_facts(p, d) for p, d in zip(prepared, drawn, strict=True)],
        "rows": rows,
        "confound": confound | {"params": confound_params},
        "pyradiomics": pyradiomics,
        "data_files": data_files(root, prepared, sequences, extra),
        "machine": machine_facts() | {"load_average": [round(load_start, 2), load_average()]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def add_brats_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (the standalone command and ``omnienc bench`` share them)."""
    add = parser.add_argument
    add("--encoder", required=True, help="checkpoint folder or random:ARCH[:SEED]")
    add("--data", type=Path, help="data root (default: $OMNIENC_DATA or ../shared/data)")
    add("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    add("--quick", action="store_true", help="fewer crops, one floor seed, shorter training")
    add("-q", "--quiet", action="store_true", help="no progress output")
    add("--seed", type=int, default=0, help="seed of the crop draw, the probes, the bootstrap")
    add("--sequences", nargs="+", choices=SEQUENCES, default=list(SEQUENCES), help="MR sequences")
    group = parser.add_argument_group("budget (defaults: full mode, quick mode)")
    full, quick = budget_options(FULL_BUDGET), budget_options(QUICK_BUDGET)
    for k, (kind, what) in BUDGET_OPTIONS.items():
        flag = "--" + k.replace("_", "-")
        group.add_argument(flag, type=kind, help=f"{what} ({full[k]:g}, {quick[k]:g})")


def budget_from_args(args: argparse.Namespace) -> BratsBudget:
    """The mode's budget (``args.quick``) with the command line's budget options."""
    base = QUICK_BUDGET if args.quick else FULL_BUDGET
    return budget_from_options(base, {k: getattr(args, k, None) for k in BUDGET_OPTIONS})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnienc.benchmarks.brats_classify``: run, write OUT.json and OUT.md."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_brats_classification_arguments(parser)
    args = parser.parse_args(argv)
    payload = run_brats_classification(
        args.encoder,
        args.data,
        quick=args.quick,
        progress=not args.quiet,
        seed=args.seed,
        budget=budget_from_args(args),
        sequences=args.sequences,
        command=f"{MODULE} {shlex.join(sys.argv[1:] if argv is None else list(argv))}",
    )
    json_path, md_path = write_brats_classification(payload, args.out)
    if not args.quiet:
        print(f"wrote {json_path} and {md_path} ({payload['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
