"""Few-shot in-context segmentation Dice: support from one volume, query from another.

    python -m omnienc.benchmarks.fewshot --checkpoint checkpoints/omnienc-cpu30 \\
        --out benchmarks/results/fewshot

Support: ``totalsegmentator/example_ct_sm.nii.gz`` with ``example_seg.nii.gz``. Query: the
20-slice DICOM CT series ``totalsegmentator/example_ct_dicom`` (another patient and scanner) with
``example_seg_dicom.nii.gz``. Every TotalSegmentator structure with at least ``--min-voxels``
voxels in both label maps is segmented in the query from the support alone, and scored by Dice on
the query's native grid. Three methods run through the same code:

* the pretrained encoder + in-context head of the checkpoint;
* a random-init encoder + head of the same shape (the floor);
* an intensity prototype: query voxels within ``k`` standard deviations of the support
  structure's mean preprocessed intensity, largest connected component (no learning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from omnienc.checkpoint import load_encoder
from omnienc.data.labeled import read_label_map
from omnienc.data.root import resolve_data_root
from omnienc.encoders import random_like
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import build_incontext_head
from omnienc.pretext.segment import load_incontext_head, resample_to_grid, segment_fewshot
from omnienc.transforms import preprocess_volume

SUPPORT = ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz")
QUERY = ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def intensity_prototype(
    support: Any, support_mask: np.ndarray, query: Any, pre: Preprocessing, k: float = 1.5
) -> np.ndarray:
    """The no-learning baseline: intensity window of the support structure, largest component.

    Returns:
        ``(X, Y, Z)`` bool on the query's native grid.
    """
    # The query is not cropped, as in omnienc.pretext.segment: predictions map back to its grid.
    pre = dataclasses.replace(pre, crop_foreground=False, spatial_size=None)
    s = preprocess_volume(support, pre, label=support_mask.astype(np.int64))
    values = s["image"][0][s["label"][0] > 0]
    mu, sigma = float(values.mean()), float(values.std())
    q = preprocess_volume(query, pre)
    cand = np.abs(q["image"][0] - mu) <= k * max(sigma, 1e-3)
    lab, n = ndimage.label(cand)
    if n == 0:
        return np.zeros(query.shape, bool)
    sizes = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
    keep = (lab == 1 + int(np.argmax(sizes))).astype(np.float32)
    back = resample_to_grid(keep, q["affine"], query.shape, query.affine, order=0)
    return np.asarray(back) > 0.5


def run(checkpoint: Path, data_root: Path, min_voxels: int, seed: int) -> dict[str, Any]:
    """Dice per structure and method."""
    vol = data_root / "volumes"
    support = read_volume(vol / SUPPORT[0])
    support_lab = read_label_map(vol / SUPPORT[1]).array.astype(np.int64)
    query = read_volume(vol / QUERY[0])
    query_lab = read_label_map(vol / QUERY[1]).array.astype(np.int64)
    encoder, pre = load_encoder(checkpoint)
    head, meta = load_incontext_head(checkpoint, encoder)
    crop = tuple(meta.get("crop_size", (64, 64, 64)))
    rnd_encoder = random_like(encoder, seed).eval()
    rnd_head = build_incontext_head(rnd_encoder.feature_info, meta["incontext_head"]).eval()
    ids_s, n_s = np.unique(support_lab, return_counts=True)
    ids_q, n_q = np.unique(query_lab, return_counts=True)
    count_s, count_q = dict(zip(ids_s, n_s, strict=True)), dict(zip(ids_q, n_q, strict=True))
    labels = sorted(
        int(i)
        for i in set(count_s) & set(count_q)
        if i > 0 and count_s[i] >= min_voxels and count_q[i] >= min_voxels
    )
    rows = []
    for label in labels:
        s_mask = support_lab == label
        truth = query_lab == label
        row: dict[str, Any] = {
            "label": label,
            "support_voxels": int(s_mask.sum()),
            "query_voxels": int(truth.sum()),
        }
        for name, (enc, hd) in {
            "pretrained": (encoder, head),
            "random-init": (rnd_encoder, rnd_head),
        }.items():
            start = time.perf_counter()
            _, pred = segment_fewshot(enc, hd, pre, support, s_mask, query, crop_size=crop)
            row[name] = dice(pred, truth)
            row[f"{name}_s"] = time.perf_counter() - start
        row["intensity"] = dice(intensity_prototype(support, s_mask, query, pre), truth)
        rows.append(row)
        print(
            f"label {label:3d}: "
            + ", ".join(f"{m} {row[m]:.3f}" for m in ("pretrained", "random-init", "intensity")),
            flush=True,
        )
    means = {
        m: float(np.mean([r[m] for r in rows])) if rows else float("nan")
        for m in ("pretrained", "random-init", "intensity")
    }
    return {"checkpoint": str(checkpoint), "crop_size": list(crop), "rows": rows, "mean": means}


def to_markdown(result: dict[str, Any], command: str) -> str:
    """The results table with its command."""
    lines = [
        "# Few-shot in-context segmentation (support and query from different CT volumes)",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "",
        f"Checkpoint: `{result['checkpoint']}`; crop {result['crop_size']}. Support: "
        f"`{SUPPORT[0]}` + `{SUPPORT[1]}`; query: `{QUERY[0]}` (DICOM) + `{QUERY[1]}`. "
        "Dice on the query's native grid, one run per structure (TotalSegmentator class id). "
        "*random-init*: encoder and head of the same shape, untrained. *intensity*: support "
        "mean +- 1.5 SD of the preprocessed intensity, largest component.",
        "",
        "| label | support voxels | query voxels | pretrained | random-init | intensity |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['support_voxels']} | {r['query_voxels']} | "
            f"{r['pretrained']:.3f} | {r['random-init']:.3f} | {r['intensity']:.3f} |"
        )
    m = result["mean"]
    lines.append(
        f"| **mean** ({len(result['rows'])}) | | | **{m['pretrained']:.3f}** | "
        f"{m['random-init']:.3f} | {m['intensity']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    import sys

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path)
    p.add_argument("--min-voxels", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fewshot"))
    args = p.parse_args(argv)
    result = run(args.checkpoint, resolve_data_root(args.data), args.min_voxels, args.seed)
    command = "python -m omnienc.benchmarks.fewshot " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(to_markdown(result, command))
    print(to_markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
