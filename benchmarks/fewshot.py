"""``omnienc bench fewshot``: few-shot in-context segmentation, the pretrained head vs baselines.

    python -m omnienc.benchmarks.fewshot --encoder checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/bench/fewshot

Every ordered pair of two labelled scans of one modality, body region (and MR sequence) from
two subjects (:mod:`omnienc.benchmarks.fewshot_pairs`: the abdominal CTs, the BraTS cases on
FLAIR and on T1c, the pyradiomics brain lesions), on every structure both hold with at least
``--min-voxels`` native voxels: the support's mask segments the query, Dice on the query's
native grid. Two diagnostics run on each support scan: *identity* (the scan is its own query)
and *intra-scan* (the scan cut across the structure: the support is one half, the query the
other). ``--shots k`` gives each query k supports from k scans where the group has them. All
methods share the plan, the masks and the Dice:

* ``head``: the checkpoint's encoder + in-context head (MASS, https://arxiv.org/abs/2603.13660),
  as :func:`omnienc.pretext.segment.segment_fewshot` runs it; k supports average their maps;
* ``head_random``: a random-init encoder and head of the same shape (the floor);
* ``prototype`` / ``prototype_random``: frozen-feature prototype matching
  (:mod:`omnienc.adapters.segmentation.prototype`) with the checkpoint's / the random-init encoder;
* ``intensity``: the support's intensity window, largest component;
* ``registration``: SimpleITK affine + demons atlas registration
  (:mod:`omnienc.benchmarks.registration`); k atlases by majority vote.

Each scan is read and preprocessed once, each query's windows encoded once per encoder, each
support's reference once, and each (support, query) registration once for all structures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnienc.benchmarks.fewshot_pairs import (
    CATALOGUE,
    EXCLUDED,
    LabelledScan,
    cross_queries,
    in_quick_subset,
    scans_by_key,
)
from omnienc.benchmarks.fewshot_report import format_fewshot_markdown, summarize, summary_metrics
from omnienc.benchmarks.fewshot_rows import FewshotRun
from omnienc.benchmarks.fewshot_scans import read_scan, scan_files
from omnienc.benchmarks.fewshot_setup import (
    DEFAULT_MIN_VOXELS,
    DEFAULT_OVERLAP,
    METHODS,
    Settings,
    build_roles,
    method_descriptions,
)
from omnienc.benchmarks.registration import QUICK_REGISTRATION, RegistrationConfig, describe
from omnienc.benchmarks.report import machine_facts, write_report
from omnienc.checkpoint import file_sha256
from omnienc.cli.common import add_crop_size_flag, crop_size_from_flag
from omnienc.data.root import resolve_data_root

__all__ = [
    "METHODS",
    "add_fewshot_arguments",
    "format_fewshot_markdown",
    "main",
    "run_fewshot",
    "summary_metrics",
    "write_fewshot",
]
DEFAULT_OUT = Path("benchmarks/results/bench/fewshot")
SHIPPED_CHECKPOINT = Path("checkpoints/omnienc-cpu30min")


def _plan(
    catalogue: Sequence[LabelledScan], shots: int, quick: bool
) -> list[tuple[tuple[str, ...], str]]:
    """The (supports, query) scan sets to run (``quick``: those of the fixed subset)."""
    scans = scans_by_key(catalogue)
    sets = cross_queries(catalogue, shots)
    if not quick:
        return sets
    return [
        (sup, q)
        for sup, q in sets
        if any(in_quick_subset(scans[q].group, sup, q, st.name) for st in scans[q].structures)
    ]


def run_fewshot(
    encoder_spec: str,
    data_root: Path | None,
    *,
    shots: int = 1,
    quick: bool = False,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    seed: int = 0,
    min_voxels: int = DEFAULT_MIN_VOXELS,
    catalogue: Sequence[LabelledScan] = CATALOGUE,
    registration: RegistrationConfig | None = None,
    overlap: float = DEFAULT_OVERLAP,
    crop_size: Sequence[int] | None = None,
    runner: type[FewshotRun] = FewshotRun,
) -> dict[str, Any]:
    """Run the few-shot benchmark; return the JSON-able payload.

    Args:
        encoder_spec: An exported checkpoint folder, or ``random:ARCH[:SEED]`` (no head: only
            the prototype matcher of that encoder and the encoder-free methods run).
        data_root: The shared data folder (``None``: :func:`~omnienc.data.root.resolve_data_root`).
        shots: Supports per query (up to the scans a group has).
        quick: The fixed subset (both CT directions, four BraTS FLAIR whole-tumour pairs, the
            brain lesions) with a cheaper registration.
        methods: Subset of :data:`METHODS` (default: all that the encoder allows).
        progress: Print one line per finished query.
        seed: Seed of the random-init floor (and of a ``random:ARCH`` spec without one).
        min_voxels: Native voxels a structure needs in every scan of a query.
        catalogue: The labelled scans (default :data:`~.fewshot_pairs.CATALOGUE`).
        registration: Registration settings (default: :class:`RegistrationConfig`, or
            :data:`QUICK_REGISTRATION` with ``quick``).
        overlap: Sliding-window overlap of the encoder methods (see ``DEFAULT_OVERLAP``).
        crop_size: Reference crop and window size of the encoder methods (default:
            :func:`~omnienc.pretext.segment.default_window`, 192 mm at the encoder's spacing).
        runner: The class that plans and runs the queries (a diagnostic may subclass
            :class:`~omnienc.benchmarks.fewshot_rows.FewshotRun` to score more per query).

    Returns:
        ``{"encoder", "floor", "settings", "methods", "skipped_methods", "rows", "summary",
        "seconds_per_query", "seconds", "stages", "data_files", "checkpoint_files", "catalogue",
        "excluded", "machine", ...}``.

    Raises:
        CheckpointError: The checkpoint is missing or unreadable.
        ValueError: Unknown method or architecture, ``shots < 1`` or a bad ``crop_size``.
        DataError, VolumeReadError: A catalogued file is missing, unreadable or inconsistent.
    """
    start = time.perf_counter()
    requested = list(METHODS if methods is None else methods)
    unknown = sorted(set(requested) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown few-shot methods {unknown}; known: {', '.join(METHODS)}")
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    roles = build_roles(encoder_spec, seed, overlap, crop_size)
    skipped = {m: roles.unavailable[m] for m in requested if m in roles.unavailable}
    run_methods = [m for m in METHODS if m in requested and m not in skipped]
    reg = registration or (QUICK_REGISTRATION if quick else RegistrationConfig())
    settings = Settings(shots, quick, min_voxels, roles.crop_size, overlap, reg)
    volumes = resolve_data_root(data_root) / "volumes"

    plan = _plan(catalogue, shots, quick)
    scans = scans_by_key(catalogue)
    keys = [s.key for s in catalogue if any(s.key in (*sup, q) for sup, q in plan)]
    prepared = {k: read_scan(scans[k], volumes, roles.preprocessing) for k in keys}
    read_seconds = time.perf_counter() - start
    bench = runner(prepared, roles, run_methods, settings, log=print if progress else None)
    bench.plan(plan, quick)
    bench.run()

    data_files = {
        str(p.relative_to(volumes)): file_sha256(p)
        for k in keys
        for p in scan_files(scans[k], volumes)
    }
    rows = bench.rows()
    spacing = roles.preprocessing.spacing  # the windows' voxel size in mm
    payload: dict[str, Any] = {
        "benchmark": "fewshot",
        "encoder": roles.info,
        "floor": roles.floor,
        "settings": {
            **settings.to_dict(),
            "registration_text": describe(reg),
            "seed": seed,
            "spacing": None if spacing is None else [float(v) for v in spacing],
        },
        "methods": run_methods,
        "method_descriptions": method_descriptions(run_methods, settings),
        "skipped_methods": skipped,
        "rows": rows,
        "summary": summarize(rows, run_methods),
        "seconds_per_query": bench.seconds_per_query(),
        "stages": {"read": round(read_seconds, 1), **bench.stage_seconds},
        "seconds": round(time.perf_counter() - start, 1),
        "data_files": data_files,
        "checkpoint_files": roles.checkpoint_files,
        "catalogue": [
            {
                f: getattr(s, f)
                for f in ("key", "image", "labels", "modality", "region", "group", "subject")
            }
            for s in catalogue
            if s.key in keys
        ],
        "excluded": [list(e) for e in EXCLUDED],
        "machine": machine_facts(),
    }
    return payload


def write_fewshot(payload: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``OUT.json`` and ``OUT.md`` atomically; return both paths."""
    return write_report(Path(out), payload, format_fewshot_markdown(payload), newline=True)


def add_fewshot_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the benchmark's flags on ``parser`` (``omnienc bench fewshot`` and this module)."""
    parser.add_argument(
        "--encoder",
        metavar="CKPT",
        help=f"exported encoder folder, or random:ARCH[:SEED] (default: {SHIPPED_CHECKPOINT})",
    )
    parser.add_argument(
        "--shots",
        type=int,
        default=1,
        help="supports per query, from different scans (BraTS: <= 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fixed subset (CT both ways, 4 BraTS FLAIR whole-tumour pairs, brain lesions), "
        "cheaper registration",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="subset of the methods (default: all)"
    )
    parser.add_argument(
        "--min-voxels",
        type=int,
        default=DEFAULT_MIN_VOXELS,
        help="native voxels a structure needs in every scan of a query "
        f"(default {DEFAULT_MIN_VOXELS})",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output path without suffix ({DEFAULT_OUT})"
    )
    parser.add_argument(
        "--data", type=Path, help="data root (default $OMNIENC_DATA or ../shared/data)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-query lines")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init floor")
    add_crop_size_flag(
        parser,
        "reference crop and window size of the encoder methods, one int or three "
        "(default: 192 mm at the encoder's spacing, MASS's field of view: 96 at 2 mm)",
    )


def crop_size_arg(
    parser: argparse.ArgumentParser, values: Sequence[int] | None
) -> tuple[int, int, int] | None:
    """``--crop-size`` (:func:`~omnienc.cli.common.crop_size_from_flag`); a parser error if bad."""
    try:
        return crop_size_from_flag(values)
    except ValueError as e:
        parser.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnienc.benchmarks.fewshot``: run, write JSON + Markdown, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m omnienc.benchmarks.fewshot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_fewshot_arguments(parser)
    args = parser.parse_args(argv)
    encoder = args.encoder or str(SHIPPED_CHECKPOINT)
    payload = run_fewshot(
        encoder,
        args.data,
        shots=args.shots,
        quick=args.quick,
        methods=args.methods,
        progress=not args.quiet,
        seed=args.seed,
        min_voxels=args.min_voxels,
        crop_size=crop_size_arg(parser, args.crop_size),
    )
    words = list(sys.argv[1:] if argv is None else argv)
    payload["command"] = " ".join(["python -m omnienc.benchmarks.fewshot", *words])
    json_path, md_path = write_fewshot(payload, args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
