"""The evaluation suite on one or more encoders: ``omnienc bench summary``.

    omnienc bench summary --encoder CKPT [CKPT ...] [--compare CKPT ...] [--quick]

For each encoder, every task of the suite runs beside a random-init encoder of the same shape
(the tasks and the scores are :mod:`omnienc.benchmarks.summary`'s), and one table per encoder
is printed and written with the aggregate across encoders (pretraining seeds of one recipe:
the SD of every metric and of the mean normalised gain, and the smallest callable difference);
each ``--compare`` encoder (another recipe) is judged against the seeds' mean by that rule.
``--quick`` runs each task's quick mode: the recipe comparison, under 10 minutes per encoder on
2 CPU cores; the full mode is what ``omnienc bench all`` reports. An ``--encoder`` or
``--compare`` entry that is a ``.json`` file written by an earlier ``bench summary`` stands for
the encoders scored in it, which are not run again (their mode must match ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnienc.benchmarks.fewshot_windows import fewshot_window_record
from omnienc.benchmarks.summary import (
    SuiteScore,
    mean_normalised_gain,
    scores_from_classification,
    scores_from_pairs,
    scores_from_segmentation,
    scores_of,
    write_summary,
)
from omnienc.errors import DataError

DEFAULT_OUT = Path("benchmarks/results/bench/summary")


@dataclass(frozen=True)
class SuitePlan:
    """How much of each task to run.

    Attributes:
        quick: Each task's quick mode.
        seg_steps: Steps of the CT segmentation decoder.
        seg_seeds: Its seeds.
        medmnist: ``(flag, size)`` of the linear-probe tasks.
    """

    quick: bool = False
    seg_steps: int = 300
    seg_seeds: tuple[int, ...] = (0, 1)
    medmnist: tuple[tuple[str, int], ...] = (
        ("adrenalmnist3d", 28),
        ("breastmnist", 28),
        ("retinamnist", 28),
    )

    @classmethod
    def for_mode(cls, quick: bool) -> SuitePlan:
        return cls(quick=True, seg_steps=150, seg_seeds=(0,)) if quick else cls()


def run_suite(
    encoder_spec: str,
    data_root: Path | None = None,
    *,
    plan: SuitePlan | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Every task of the suite for one encoder; returns the payload with its scores.

    Args:
        encoder_spec: Exported checkpoint folder (``random:ARCH[:SEED]`` for a floor alone).
        data_root: The data root (default: :func:`omnienc.data.root.resolve_data_root`).
        plan: What to run (default: the full suite).
        cache_dir: Feature cache of the MedMNIST probes.
        progress: Progress bars.
        log: One line per finished task.
    """
    from omnienc.benchmarks import brats_classify, brats_labeleff, fewshot
    from omnienc.benchmarks.classification import run_classification
    from omnienc.benchmarks.segmentation import run_segmentation_suite
    from omnienc.data.root import resolve_data_root

    plan = plan or SuitePlan()
    root = resolve_data_root(data_root)
    start = time.perf_counter()
    scores: list[SuiteScore] = []
    seconds: dict[str, float] = {}

    def timed(name: str, job: Callable[[], list[SuiteScore]]) -> None:
        t0 = time.perf_counter()
        new = job()
        seconds[name] = round(time.perf_counter() - t0, 1)
        scores.extend(new)
        for s in new:
            log(f"summary | {encoder_spec} | {s.task}: {s.value:.3f} (floor {s.floor})")

    for flag, size in plan.medmnist:
        timed(
            f"{flag}_{size}",
            lambda flag=flag, size=size: scores_from_classification(  # type: ignore[misc]
                run_classification(
                    flag,
                    size,
                    encoder_spec,
                    medmnist_root=root / "medmnist",
                    fractions=(1.0,),
                    methods=("linear",),
                    cache_dir=cache_dir,
                    progress=progress,
                    log=lambda _line: None,
                )
            ),
        )
    timed(
        "ct_segmentation",
        lambda: scores_from_segmentation(
            run_segmentation_suite(
                encoder_spec,
                seeds=plan.seg_seeds,
                steps=plan.seg_steps,
                fine_tune=False,
                data_root=root,
                progress=progress,
                log=lambda _line: None,
            )
        ),
    )
    windows: list[dict[str, Any]] = []

    def fewshot_part() -> list[SuiteScore]:
        few = fewshot.run_fewshot(encoder_spec, root, quick=plan.quick, progress=progress)
        windows.append(fewshot_window_record(few))
        return fewshot_scores(few)

    timed("fewshot", fewshot_part)
    timed(
        "brats_classify",
        lambda: brats_classify_scores(
            brats_classify.run_brats_classification(
                encoder_spec, root, quick=plan.quick, progress=progress
            )
        ),
    )
    timed(
        "brats_labeleff",
        lambda: brats_labeleff_scores(
            brats_labeleff.run_brats_label_efficiency(
                encoder_spec,
                root,
                quick=True,  # the frozen decoders; the end-to-end rows are bench all's
                progress=progress,
            )
        ),
    )
    return {
        "encoder": encoder_spec,
        "plan": asdict(plan),
        "scores": [asdict(s) for s in scores],
        "mean_normalised_gain": mean_normalised_gain(scores),
        **windows[0],
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def summary_of_bench_all(
    encoder_spec: str,
    classification: Sequence[dict[str, Any]],
    segmentation: dict[str, Any] | None,
    fewshot: dict[str, Any] | None,
    brats_classify: dict[str, Any] | None,
    brats_labeleff: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """The suite payload of ``omnienc bench all``'s results (full mode), without re-running.

    Classification payloads of sets that are not in :class:`SuitePlan`'s ``medmnist`` (e.g.
    AdrenalMNIST3D at 64^3) are left out, so the summary has the same tasks as ``bench summary``.
    """
    wanted = set(SuitePlan().medmnist)
    scores: list[SuiteScore] = []
    for payload in classification:
        if (payload["dataset"], payload["size"]) in wanted:
            scores += scores_from_classification(payload)
    if segmentation is not None:
        scores += scores_from_segmentation(segmentation)
    if fewshot is not None:
        scores += fewshot_scores(fewshot)
    if brats_classify is not None:
        scores += brats_classify_scores(brats_classify)
    if brats_labeleff is not None:
        scores += brats_labeleff_scores(brats_labeleff)
    return {
        "encoder": encoder_spec,
        "plan": asdict(SuitePlan()),
        "scores": [asdict(s) for s in scores],
        "mean_normalised_gain": mean_normalised_gain(scores),
        **fewshot_window_record(fewshot),
        "seconds": {},
        "total_seconds": round(seconds, 1),
    }


def fewshot_scores(payload: dict[str, Any]) -> list[SuiteScore]:
    """Suite scores of a few-shot payload (:func:`.fewshot.summary_metrics`).

    The head's floor is the random-init head (which predicts nothing: Dice 0); the frozen
    prototype matcher's is the same matcher on the random-init encoder's features.
    """
    from omnienc.benchmarks.fewshot import summary_metrics

    m = summary_metrics(payload)
    out = []
    for (method, cell), label in FEWSHOT_LABELS.items():
        key, floor = f"fewshot/{method}/{cell}", f"fewshot/{method}_random/{cell}"
        if key in m and math.isfinite(m[key]):
            out.append(
                SuiteScore(key.replace("/", "_"), label, "Dice", float(m[key]), m.get(floor))
            )
    return out


def brats_classify_scores(payload: dict[str, Any]) -> list[SuiteScore]:
    """Suite scores of a BraTS classification payload."""
    from omnienc.benchmarks.brats_classify import summary_metrics

    return scores_from_pairs(summary_metrics(payload), BRATS_CLASSIFY_LABELS)


def brats_labeleff_scores(payload: dict[str, Any]) -> list[SuiteScore]:
    """Suite scores of a BraTS label-efficiency payload."""
    from omnienc.benchmarks.brats_labeleff import summary_metrics

    return scores_from_pairs(summary_metrics(payload), BRATS_LABELEFF_LABELS)


# Filled in from each benchmark's summary_metrics keys.
FEWSHOT_LABELS: dict[tuple[str, str], str] = {
    ("head", "ct"): "few-shot, in-context head, support and query from different CTs, Dice",
    ("head", "brats_flair_whole_tumour"): "few-shot, in-context head, BraTS FLAIR whole "
    "tumour across cases, Dice",
    ("prototype", "cross_scan"): "few-shot, frozen-feature prototype, all cross-scan cells, Dice",
}
BRATS_CLASSIFY_LABELS: dict[str, str] = {
    "brats_flair_tumour_auc": "BraTS FLAIR tumour vs tumour-free crops: frozen linear probe, LOCO",
    "brats_t1c_tumour_auc": "BraTS T1c tumour vs tumour-free crops: frozen linear probe, LOCO",
}
BRATS_LABELEFF_LABELS: dict[str, str] = {
    "brats_wt_dice_1case": "BraTS whole tumour: frozen decoder from 1 labelled case, Dice",
    "brats_wt_dice_3cases": "BraTS whole tumour: frozen decoder from 3 labelled cases, Dice",
}


def earlier_results(path: Path, quick: bool) -> list[dict[str, Any]]:
    """The encoders' payloads of an earlier ``bench summary`` results file.

    Args:
        path: Its ``.json`` file.
        quick: The mode this summary is in; every payload must have been run in it.

    Raises:
        DataError: The file is missing or is not a ``bench summary`` result, or a payload's mode
            differs.
    """
    try:
        body = json.loads(path.read_text())
        encoders = list(body["encoders"])
        modes = {bool(p["plan"]["quick"]) for p in encoders}
        for p in encoders:
            scores_of(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"not a readable `omnienc bench summary` result: {e}") from e
    if not encoders:
        raise DataError(path, "the results file scores no encoder")
    if modes != {quick}:
        have = " and ".join(sorted("quick" if m else "full" for m in modes))
        want = "quick" if quick else "full"
        raise DataError(path, f"its encoders were scored in {have} mode, this summary is {want}")
    return encoders


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the suite on each encoder, write ``OUT.json`` / ``OUT.md``, print it."""
    parser = argparse.ArgumentParser(
        prog="omnienc bench summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--encoder",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="exported encoder folders (several: seeds of one recipe, aggregated)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="CKPT",
        help="other encoders, each judged against the --encoder seeds by the noise rule",
    )
    parser.add_argument(
        "--seed-sd",
        type=float,
        metavar="SD",
        help="SD of the mean normalised gain across pretraining seeds, measured elsewhere: "
        "judges --compare against one --encoder run, or replaces the seeds' own SD",
    )
    parser.add_argument("--quick", action="store_true", help="each task's quick mode")
    parser.add_argument("--data", type=Path, help="data root (default: $OMNIENC_DATA)")
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default ~/.cache/omnienc)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results path, no suffix")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.seed_sd is not None and not args.seed_sd > 0:
        parser.error(f"--seed-sd must be positive, got {args.seed_sd}")
    from omnienc.data.folder import default_cache_dir

    words = list(sys.argv[1:] if argv is None else argv)
    command = "omnienc bench summary " + " ".join(words)
    plan = SuitePlan.for_mode(args.quick)

    def payloads_of(spec: str) -> list[dict[str, Any]]:
        if spec.endswith(".json"):
            return earlier_results(Path(spec), quick=args.quick)
        return [
            run_suite(
                spec,
                args.data,
                plan=plan,
                cache_dir=args.cache_dir or default_cache_dir(),
                progress=not args.quiet,
            )
        ]

    try:
        seeds = [p for spec in args.encoder for p in payloads_of(spec)]
        others = [p for spec in args.compare for p in payloads_of(spec)]
    except DataError as e:
        parser.exit(2, f"omnienc bench summary: error: {e}\n")
    json_path, md_path = write_summary(seeds, args.out, command, others, args.seed_sd)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
