"""Group means with bootstrap intervals, headline numbers and Markdown of the few-shot benchmark.

A *cell* is one line of the summary: CT, each BraTS sequence x region, the brain lesions, and the
two diagnostics, intra-scan and identity (pooled, and per source group). Intervals are
percentile bootstrap 95% intervals over the cell's queries (a query is a support set, a query
scan and a structure: queries are resampled, never voxels); a paired interval compares two
methods on the same queries. A second interval resamples scan pairs (a support set and a query
scan, with all their structures: a cluster bootstrap), the unit a new patient would add; with
two CT pairs and four BraTS cases it is wide, and that width is the honest one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

CROSS_GROUPS = ("CT", "BraTS-FLAIR", "BraTS-T1c", "brain lesion")
DIAGNOSTIC_GROUPS = ("intra-scan", "identity")
REGIONS = ("whole_tumour", "tumour_core", "enhancing_tumour")
METHOD_LABELS = {
    "head": "head (pretrained)",
    "head_random": "head (random-init)",
    "prototype": "prototype (pretrained)",
    "prototype_random": "prototype (random-init)",
    "intensity": "intensity",
    "registration": "registration",
    "head_atlas": "head in atlas region",
    "prototype_atlas": "prototype in atlas region",
}
# Paired comparisons reported with their interval: (method, reference).
COMPARISONS = (
    ("head", "head_random"),
    ("prototype", "prototype_random"),
    ("head", "prototype"),
    ("head", "registration"),
    ("head_atlas", "registration"),
    ("head_atlas", "prototype_atlas"),
)
N_BOOT = 2000


def bootstrap_mean(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values`` with its percentile bootstrap 95% interval (items resampled).

    Returns:
        ``{"mean", "lo", "hi", "n"}`` (``None`` values for an empty list; a single value is its
        own interval).
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    means = x[np.random.default_rng(seed).integers(0, x.size, (n_boot, x.size))].mean(axis=1)
    return {
        "mean": round(float(x.mean()), 4),
        "lo": round(float(np.percentile(means, 2.5)), 4),
        "hi": round(float(np.percentile(means, 97.5)), 4),
        "n": int(x.size),
    }


def bootstrap_pairs_mean(
    values: Sequence[float], pairs: Sequence[Any], n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """Mean of ``values`` with a cluster-bootstrap 95% interval that resamples scan pairs.

    Args:
        values: One value per query.
        pairs: The scan pair of each query (any hashable), the resampled unit.
        n_boot: Replicates.
        seed: Seeds the resampling.

    Returns:
        ``{"mean", "lo", "hi", "pairs"}``; the mean is the mean over queries, each replicate's
        the mean over the queries of the drawn pairs (``None`` values for an empty list).
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "pairs": 0}
    keys = sorted(set(pairs), key=repr)
    index = {k: i for i, k in enumerate(keys)}
    member = np.array([index[p] for p in pairs])
    sums = np.bincount(member, weights=x, minlength=len(keys))
    counts = np.bincount(member, minlength=len(keys)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return {
        "mean": round(float(x.mean()), 4),
        "lo": round(float(np.percentile(means, 2.5)), 4),
        "hi": round(float(np.percentile(means, 97.5)), 4),
        "pairs": len(keys),
    }


def scan_pair(row: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """The scan pair a query belongs to: its supports and its query scan."""
    return tuple(sorted(row["supports"])), str(row["query"])


def cells_of(row: dict[str, Any]) -> list[str]:
    """The summary cells a row counts in."""
    group = row["group"]
    if group in ("BraTS-FLAIR", "BraTS-T1c"):
        return [f"{group} {row['structure']}"]
    if group in DIAGNOSTIC_GROUPS:
        return [group, f"{group} {row['source']}"]
    return [group]


def cell_order() -> list[str]:
    """Every cell a payload can have, in table order."""
    brats = [f"{g} {r}" for g in ("BraTS-FLAIR", "BraTS-T1c") for r in REGIONS]
    per_source = [f"{d} {g}" for d in DIAGNOSTIC_GROUPS for g in CROSS_GROUPS]
    return ["CT", *brats, "brain lesion", *DIAGNOSTIC_GROUPS, *per_source]


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per cell: each method's mean Dice with its interval, and the paired comparisons.

    Returns:
        ``{"cells": {cell: {method: bootstrap_mean}}, "comparisons": {cell: {"A - B":
        bootstrap_mean of the paired differences}}, "pair_intervals": {cell: {method:
        bootstrap_pairs_mean}}}``, cells in :func:`cell_order`.
    """
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for cell in cells_of(row):
            members.setdefault(cell, []).append(row)
    cells, comparisons, by_pairs = {}, {}, {}
    for cell in (c for c in cell_order() if c in members):
        group = members[cell]
        cells[cell] = {
            m: bootstrap_mean([r["dice"][m] for r in group if m in r["dice"]]) for m in methods
        }
        by_pairs[cell] = {
            m: bootstrap_pairs_mean(
                [r["dice"][m] for r in group if m in r["dice"]],
                [scan_pair(r) for r in group if m in r["dice"]],
            )
            for m in methods
        }
        pairs = {}
        for a, b in COMPARISONS:
            if a in methods and b in methods:
                diffs = [
                    r["dice"][a] - r["dice"][b] for r in group if a in r["dice"] and b in r["dice"]
                ]
                pairs[f"{a} - {b}"] = bootstrap_mean(diffs)
        comparisons[cell] = pairs
    return {"cells": cells, "comparisons": comparisons, "pair_intervals": by_pairs}


def slug(text: str) -> str:
    """``"BraTS-FLAIR whole_tumour"`` -> ``"brats_flair_whole_tumour"``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def summary_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """The headline numbers for the cross-task summary table.

    Names are ``fewshot/<method>/<cell>`` with the cell slugged (``ct``,
    ``brats_flair_whole_tumour``, ..., ``brain_lesion``, ``intra_scan``, ``identity``), plus
    ``fewshot/<method>/cross_scan``: the mean of the cross-scan cells' means (CT, the six BraTS
    cells, the brain lesions, each counted once). Only cells and methods that ran appear.
    """
    out: dict[str, float] = {}
    cells = payload["summary"]["cells"]
    for method in payload["methods"]:
        cross = []
        for cell, by_method in cells.items():
            if cell.split(" ")[0] in DIAGNOSTIC_GROUPS and " " in cell:
                continue  # per-source diagnostics stay in the payload
            mean = by_method.get(method, {}).get("mean")
            if mean is None:
                continue
            out[f"fewshot/{method}/{slug(cell)}"] = float(mean)
            if cell not in DIAGNOSTIC_GROUPS:
                cross.append(float(mean))
        if cross:
            out[f"fewshot/{method}/cross_scan"] = round(float(np.mean(cross)), 4)
    return out


def _ci(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def _mean(values: Sequence[float | None]) -> str:
    kept = [v for v in values if v is not None]
    return f"{np.mean(kept):.2f}" if kept else "–"


def _diagnostics(payload: dict[str, Any], method: str) -> list[str]:
    """Precision, recall, predicted/true volume and far false positives of one method per cell."""
    lines = [
        "| cell | queries | precision | recall | predicted / true voxels | far fraction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cell in payload["summary"]["cells"]:
        rows = [r for r in payload["rows"] if cell in cells_of(r) and method in r["scores"]]
        if not rows:
            continue
        s = [r["scores"][method] for r in rows]
        ratio = [x["pred_voxels"] / r["query_voxels"] for x, r in zip(s, rows, strict=True)]
        lines.append(
            f"| {cell} | {len(rows)} | {_mean([x['precision'] for x in s])} | "
            f"{_mean([x['recall'] for x in s])} | {_mean(ratio)} | {_mean([x['far'] for x in s])} |"
        )
    return lines


def format_fewshot_markdown(payload: dict[str, Any]) -> str:
    """The Markdown report of a :func:`~omnienc.benchmarks.fewshot.run_fewshot` payload."""
    methods = payload["methods"]
    s, enc, m = payload["settings"], payload["encoder"], payload.get("machine", {})
    head = "| cell | queries | " + " | ".join(METHOD_LABELS[x] for x in methods) + " |"
    lines = [
        "# Few-shot in-context segmentation: support from one scan, query another",
        "",
        f"Command: `{payload.get('command', '(not recorded)')}`  ",
        f"Machine: {m.get('cpu')}, {m.get('torch_threads')} torch threads, GPU: "
        f"{m.get('gpu') or 'none'}; {m.get('date')}; {payload['seconds'] / 60:.1f} min in all.  ",
        f"Encoder: `{enc['source']}` ({enc['arch']}, `{enc['checkpoint']}`); floor: "
        f"`{payload.get('floor')}`.",
        "",
        f"{s['shots']} shot(s){' (quick subset)' if s['quick'] else ''}; a structure is scored "
        f"when every scan of a query has at least {s['min_voxels']} voxels of it on its native "
        f"grid. Encoder methods: the checkpoint's preprocessing (no foreground crop), reference "
        f"crop and windows {s['crop_size']}, overlap {s['overlap']}, Gaussian blending; Dice on "
        "the query's native grid. Registration: " + s["registration_text"] + ".",
    ]
    if payload.get("skipped_methods"):
        lines += [
            "",
            "Not run: " + "; ".join(f"{k}: {v}" for k, v in payload["skipped_methods"].items()),
        ]
    lines += [
        "",
        "## Mean Dice per group (bootstrap 95% interval over queries)",
        "",
        "A query is a support set, a query scan and a structure; intervals resample queries. "
        "CT's queries come from two scan pairs and each BraTS cell's from four cases, so the "
        "intervals understate the spread across scans.",
        "",
        head,
        "|---|---:|" + "---|" * len(methods),
    ]
    for cell, by_method in payload["summary"]["cells"].items():
        n = max((v["n"] for v in by_method.values()), default=0)
        lines.append(
            f"| {cell} | {n} | " + " | ".join(_ci(by_method.get(x)) for x in methods) + " |"
        )
    pair_intervals = payload["summary"].get("pair_intervals") or {}
    if pair_intervals:
        lines += [
            "",
            "The same means with intervals over scan pairs (cluster bootstrap: a support set and "
            "a query scan are drawn with all their structures):",
            "",
            "| cell | scan pairs | " + " | ".join(METHOD_LABELS[x] for x in methods) + " |",
            "|---|---:|" + "---|" * len(methods),
        ]
        for cell, by_method in pair_intervals.items():
            n = max((v["pairs"] for v in by_method.values()), default=0)
            lines.append(
                f"| {cell} | {n} | " + " | ".join(_ci(by_method.get(x)) for x in methods) + " |"
            )
    lines += ["", "Paired differences (same queries), mean [95% interval]:", ""]
    names = sorted({k for v in payload["summary"]["comparisons"].values() for k in v})
    if names:
        lines += ["| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for cell, comp in payload["summary"]["comparisons"].items():
            lines.append(f"| {cell} | " + " | ".join(_ci(comp.get(k)) for k in names) + " |")
    lines += [
        "",
        "Seconds per query (each method's own work, shared encoding counted for each):",
        "",
    ]
    lines += [
        "| " + " | ".join(METHOD_LABELS[x] for x in methods) + " |",
        "|" + "---:|" * len(methods),
    ]
    lines.append(
        "| " + " | ".join(f"{payload['seconds_per_query'].get(x, 0):.2f}" for x in methods) + " |"
    )
    for method in ("head", "head_random", "prototype", "head_atlas"):
        if method in methods:
            lines += [
                "",
                f"### Diagnostics of {METHOD_LABELS[method]}",
                "",
                *_diagnostics(payload, method),
            ]
    lines += [
        "",
        "*far fraction*: predicted voxels more than half a window outside the true structure's "
        "bounding box, i.e. false positives in windows that do not see the structure.",
        "",
        "## Methods",
        "",
        *[f"* **{METHOD_LABELS[k]}**: {v}" for k, v in payload["method_descriptions"].items()],
        "",
        "## Every query",
        "",
        "| group | structure | support(s) | query | voxels (support; query) | "
        + " | ".join(METHOD_LABELS[x] for x in methods)
        + " |",
        "|---|---|---|---|---|" + "---:|" * len(methods),
    ]
    for r in payload["rows"]:
        dice = " | ".join(f"{r['dice'][x]:.3f}" if x in r["dice"] else "–" for x in methods)
        group = r["group"] if r["group"] in CROSS_GROUPS else f"{r['group']} ({r['source']})"
        lines.append(
            f"| {group} | {r['structure']} | {', '.join(r['supports'])} | {r['query']} | "
            f"{'+'.join(str(v) for v in r['support_voxels'])}; {r['query_voxels']} | {dice} |"
        )
    lines += ["", "## Scans", "", "| key | image | labels | modality | region | group | subject |"]
    lines.append("|---|---|---|---|---|---|---|")
    for c in payload["catalogue"]:
        lines.append(
            f"| {c['key']} | `{c['image']}` | `{c['labels']}` | {c['modality']} | {c['region']} | "
            f"{c['group']} | {c['subject']} |"
        )
    lines += ["", "Left out:", ""] + [f"* `{f}`: {why}" for f, why in payload["excluded"]]
    lines += [
        "",
        "Data files (sha256): "
        + ", ".join(f"`{k}` `{v[:12]}…`" for k, v in payload["data_files"].items()),
    ]
    lines += [
        "",
        "Checkpoint files (sha256): "
        + (
            ", ".join(f"`{k}` `{v[:12]}…`" for k, v in payload["checkpoint_files"].items())
            or "none (random-init)"
        ),
    ]
    return "\n".join(lines) + "\n"
