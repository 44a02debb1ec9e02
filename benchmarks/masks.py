"""How well the class-agnostic mask proposals cover labelled anatomy, and how fast they are.

On every labelled CT/MR pair of the real data (TotalSegmentator examples), the image and its
label map are preprocessed together with the default :class:`omnienc.Preprocessing` through
:class:`omnienc.data.labeled.LabeledVolumes`, so proposals and labels share the 2 mm grid that
pretraining uses. For every labelled structure with at least ``--min-voxels`` voxels on that grid,
the score is the IoU of the best-matching proposal (*best IoU*, the recall measure of object
proposals: a structure counts as found when some proposal overlaps it well). The labels are
never seen by the proposals.

Reported per volume and overall (pooled over structures): structures, mean best IoU, fraction
of structures with best IoU > 0.5, proposals per volume, seconds per volume; for the default
:class:`~omnienc.pretext.masks.MaskConfig`, for each provider alone, and for other caps on the
number of proposals. Also the seconds for one 128^3 volume (``example_ct.nii.gz`` preprocessed
and centre-cropped/padded to 128^3). SimpleITK runs on one thread throughout; the machine's load
average and the share of its CPU that other processes used are recorded with each timing.

Run::

    python -m omnienc.benchmarks.masks                 # -> benchmarks/results/masks.{json,md}
    python -m omnienc.benchmarks.masks --repeats 5 --output-dir /tmp/out

The SAM2 provider (MASS's generator) needs weights and, to be practical, a GPU; with
``--sam2 PATH_OR_ID`` it is scored beside the classical providers ("sam2 only", and in "all
providers"), and timed on the 128^3 volume too (the device is recorded)::

    python -m omnienc.benchmarks.masks --sam2 facebook/sam2.1-hiera-tiny --repeats 1 \
        --output-dir /tmp/sam2-bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import SimpleITK as sitk

from omnienc.benchmarks.machine import cpu_model, cpu_seconds, load_average
from omnienc.data.labeled import LabeledVolumes
from omnienc.data.root import resolve_data_root
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.masks import MASK_PROVIDERS, MaskConfig, propose_masks
from omnienc.transforms import preprocess_volume

RESULTS = Path(__file__).resolve().parent / "results"

# (image, label map) below <data root>/volumes; the DICOM image is a series folder.
PAIRS = (
    ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz"),
    ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz"),
    (
        "totalsegmentator/pulmonary_ct_cropped.nii.gz",
        "totalsegmentator/pulmonary_artery_seg.nii.gz",
    ),
    ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz"),
)
TIMING_VOLUME = "totalsegmentator/example_ct.nii.gz"
TIMING_SIZE = (128, 128, 128)


def best_iou(masks: np.ndarray, label: np.ndarray, min_voxels: int) -> dict[int, dict[str, float]]:
    """Best IoU of any proposal with each labelled structure.

    Args:
        masks: ``(K, X, Y, Z)`` bool proposals.
        label: ``(X, Y, Z)`` integer label map on the same grid (0 is background).
        min_voxels: Structures with fewer voxels are left out.

    Returns:
        ``{label: {"voxels": n, "best_iou": iou, "best_mask": k}}`` (``best_mask`` -1 when
        ``K = 0``).
    """
    n_labels = int(label.max()) + 1
    # (K, L) intersections of every proposal with every label, and proposal sizes.
    inter = np.zeros((len(masks), n_labels))
    for k, mask in enumerate(masks):
        inter[k] = np.bincount(label[mask], minlength=n_labels)
    sizes = masks.reshape(len(masks), int(np.prod(masks.shape[1:]))).sum(axis=1).astype(np.float64)
    counts = np.bincount(label.reshape(-1), minlength=n_labels)
    out: dict[int, dict[str, float]] = {}
    for s in np.flatnonzero(counts >= min_voxels):
        if s == 0:
            continue
        iou = inter[:, s] / (sizes + counts[s] - inter[:, s]) if len(masks) else np.zeros(0)
        k = int(np.argmax(iou)) if iou.size else -1
        out[int(s)] = {
            "voxels": int(counts[s]),
            "best_iou": float(iou[k]) if k >= 0 else 0.0,
            "best_mask": k,
        }
    return out


def timed_proposals(image: np.ndarray, config: MaskConfig, repeats: int) -> dict[str, Any]:
    """Run :func:`propose_masks` ``repeats`` times; median seconds and the machine's load.

    Returns:
        ``{"masks": (K, X, Y, Z) bool, "seconds": median, "seconds_all": [...],
        "load_before": 1-min load average, "other_cpu_pct": share of the machine's CPU that
        other processes used meanwhile}``.
    """
    load = load_average()
    busy0, own0 = cpu_seconds()
    start = time.perf_counter()
    times, masks = [], np.zeros((0, *image.shape), dtype=bool)
    for _ in range(repeats):
        t0 = time.perf_counter()
        masks = propose_masks(image, config)
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    busy1, own1 = cpu_seconds()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1))
    return {
        "masks": masks,
        "seconds": statistics.median(times),
        "seconds_all": times,
        "load_before": load,
        "other_cpu_pct": 100 * other,
    }


def load_pairs(root: Path) -> list[dict[str, Any]]:
    """The labelled volumes, preprocessed with the default :class:`Preprocessing`.

    Returns:
        ``[{"name", "modality", "image": (X, Y, Z) float32, "label": (X, Y, Z) int64}]``.
    """
    volumes = root / "volumes"
    data = LabeledVolumes([(volumes / i, volumes / lab) for i, lab in PAIRS], Preprocessing())
    out = []
    for (image_rel, _), item in zip(PAIRS, (data[i] for i in range(len(data))), strict=True):
        out.append(
            {
                "name": Path(image_rel).name,
                "modality": item["modality"],
                "image": item["image"].numpy()[0],
                "label": item["label"].numpy()[0],
            }
        )
    return out


def evaluate(
    name: str,
    config: MaskConfig,
    pairs: Sequence[dict[str, Any]],
    min_voxels: int,
    repeats: int,
) -> dict[str, Any]:
    """Best-IoU recall and time of one configuration on every labelled volume.

    Returns:
        ``{"name", "config", "volumes": [per-volume rows], "overall": pooled row}``.
    """
    rows = []
    pooled: list[float] = []
    for pair in pairs:
        timing = timed_proposals(pair["image"], config, repeats)
        scores = best_iou(timing["masks"], pair["label"], min_voxels)
        ious = [s["best_iou"] for s in scores.values()]
        pooled += ious
        rows.append(
            {
                "volume": pair["name"],
                "modality": pair["modality"],
                "shape": list(pair["image"].shape),
                "structures": len(ious),
                "mean_best_iou": float(np.mean(ious)) if ious else float("nan"),
                "frac_above_0_5": float(np.mean(np.array(ious) > 0.5)) if ious else float("nan"),
                "masks": len(timing["masks"]),
                "seconds": timing["seconds"],
                "load_before": timing["load_before"],
                "other_cpu_pct": timing["other_cpu_pct"],
                "per_structure": {str(k): v for k, v in scores.items()},
            }
        )
    overall = {
        "structures": len(pooled),
        "mean_best_iou": float(np.mean(pooled)),
        "frac_above_0_5": float(np.mean(np.array(pooled) > 0.5)),
        "masks_per_volume": float(np.mean([r["masks"] for r in rows])),
        "seconds_per_volume": float(np.mean([r["seconds"] for r in rows])),
    }
    return {"name": name, "config": config.to_dict(), "volumes": rows, "overall": overall}


def timing_128(root: Path, config: MaskConfig, repeats: int) -> dict[str, Any]:
    """Seconds of :func:`propose_masks` on a 128^3 preprocessed CT volume (one thread)."""
    volume = read_volume(root / "volumes" / TIMING_VOLUME)
    image = preprocess_volume(volume, Preprocessing(spatial_size=TIMING_SIZE))["image"][0]
    propose_masks(image[:32, :32, :32], config)  # warm-up: imports, allocator
    timing = timed_proposals(image, config, repeats)
    return {
        "volume": TIMING_VOLUME,
        "shape": list(image.shape),
        "masks": len(timing["masks"]),
        "seconds": timing["seconds"],
        "seconds_all": timing["seconds_all"],
        "load_before": timing["load_before"],
        "other_cpu_pct": timing["other_cpu_pct"],
    }


def configurations(default: MaskConfig, sam2: str = "") -> list[tuple[str, MaskConfig]]:
    """The default, each provider alone (default parameters), and other proposal caps.

    ``sam2`` (a checkpoint) adds the SAM2 provider; without it, it is left out.
    """
    sam2 = sam2 or default.sam2
    names = [n for n in MASK_PROVIDERS if n != "sam2" or sam2]
    out = [("default", default)]
    for name in names:
        if (name,) != default.providers:
            out.append((f"{name} only", replace(default, providers=(name,), sam2=sam2)))
    out.append(("all providers", replace(default, providers=tuple(names), sam2=sam2)))
    for cap in (24, 96):
        out.append((f"default, cap {cap}", replace(default, max_masks=cap, merge_regions=(cap,))))
    return out


# Sensitivity of the default's two merge weights, chosen on these same structures.
SWEEP_SIZE_POWER = (0.2, 0.3, 0.4, 0.5)
SWEEP_EDGE_WEIGHT = (0.35, 0.5, 0.65)


def sweep(
    default: MaskConfig, pairs: Sequence[dict[str, Any]], min_voxels: int
) -> list[dict[str, Any]]:
    """Pooled mean best IoU over a grid of ``merge_size_power`` x ``merge_edge_weight``.

    The default configuration was tuned on the structures it is scored on; the grid shows how
    much of its score is the tuning (neighbouring settings) rather than the method.
    """
    out = []
    for p in SWEEP_SIZE_POWER:
        for w in SWEEP_EDGE_WEIGHT:
            config = replace(default, merge_size_power=p, merge_edge_weight=w)
            run = evaluate("sweep", config, pairs, min_voxels, repeats=1)
            out.append({"merge_size_power": p, "merge_edge_weight": w, **run["overall"]})
    return out


def _sam2_device() -> str:
    """Where the SAM2 provider runs (what :func:`omnienc.pretext.masks.sam2.load_sam2` picks)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}), torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m omnienc.benchmarks.masks", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data", help="data root (default: $OMNIENC_DATA or ../shared/data)")
    p.add_argument("--output-dir", type=Path, default=RESULTS, help="where masks.{json,md} go")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per volume (median)")
    p.add_argument("--min-voxels", type=int, default=1000, help="smallest structure scored")
    p.add_argument(
        "--no-variants",
        action="store_true",
        help="only the default configuration (no other providers, caps or sensitivity grid; "
        "with --sam2, the default and sam2 only)",
    )
    p.add_argument(
        "--sam2",
        default="",
        metavar="PATH_OR_ID",
        help="also score the SAM2 provider with this checkpoint (folder or hub id)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from omnienc.benchmarks.masks_report import to_markdown  # it imports this module's grid

    args = parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    root = resolve_data_root(args.data)
    pairs = load_pairs(root)
    default = MaskConfig()
    configs = configurations(default, args.sam2)
    if args.no_variants:
        configs = [c for c in configs if c[0] in ("default", "sam2 only")]
    runs = []
    for name, config in configs:
        run = evaluate(name, config, pairs, args.min_voxels, args.repeats)
        o = run["overall"]
        print(
            f"{name}: mean best IoU {o['mean_best_iou']:.3f} over {o['structures']} structures, "
            f"{o['masks_per_volume']:.1f} masks, {o['seconds_per_volume']:.2f} s per volume",
            flush=True,
        )
        runs.append(run)
    grid = [] if args.no_variants else sweep(default, pairs, args.min_voxels)
    timing = timing_128(root, default, args.repeats)
    print(f"128^3: {timing['seconds']:.2f} s, {timing['masks']} masks", flush=True)
    sam2_config = replace(default, providers=("sam2",), sam2=args.sam2)
    timing_sam2 = timing_128(root, sam2_config, args.repeats) if args.sam2 else None
    if timing_sam2:
        timing_sam2["checkpoint"] = args.sam2
    report = {
        "command": shlex.join(
            ["python", "-m", "omnienc.benchmarks.masks", *(argv or sys.argv[1:])]
        ),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            "python": platform.python_version(),
            "simpleitk": sitk.Version.VersionString(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "platform": platform.platform(),
            "sam2_device": _sam2_device() if args.sam2 else None,
        },
        "min_voxels": args.min_voxels,
        "repeats": args.repeats,
        "aim": {
            "mean_best_iou": 0.5,
            "seconds_128": 5.0,
            "iou_met": runs[0]["overall"]["mean_best_iou"] >= 0.5,
            "seconds_met": timing["seconds"] < 5.0,
        },
        "runs": runs,
        "sweep": grid,
        "timing_128": timing,
        "timing_128_sam2": timing_sam2,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "masks.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "masks.md").write_text(to_markdown(report))
    print(f"wrote {args.output_dir / 'masks.json'} and {args.output_dir / 'masks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
