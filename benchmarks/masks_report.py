"""The mask benchmark's Markdown page: coverage and speed tables, command, date and machine."""

from __future__ import annotations

from typing import Any

from omnienc.benchmarks.masks import SWEEP_EDGE_WEIGHT, SWEEP_SIZE_POWER


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page: tables, command, date and machine."""
    m = report["machine"]
    t = report["timing_128"]
    default = report["runs"][0]
    lines = [
        "# Mask proposals: best-IoU recall of labelled anatomy, and speed",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, SimpleITK threads "
        f"{m['sitk_threads']}; Python {m['python']}, SimpleITK {m['simpleitk']}, NumPy "
        f"{m['numpy']}, SciPy {m['scipy']}; {m['platform']}",
        "",
        "Labelled TotalSegmentator CT/MR examples, preprocessed with the default `Preprocessing` "
        "(2 mm) together with their label maps; every structure with at least "
        f"{report['min_voxels']:,} voxels on that grid is scored by the IoU of its best-matching "
        "proposal. *mean* is pooled over structures. Seconds are the median of "
        f"{report['repeats']} runs of `propose_masks` on one SimpleITK thread; *load* is the "
        "1-minute load average before the runs and *other CPU* the share of the machine's CPU "
        "that other processes used during them.",
        "",
        f"**Default `MaskConfig`** (providers {', '.join(default['config']['providers'])}, at "
        f"most {default['config']['max_masks']} masks):",
        "",
        "| volume | modality | grid | structures | mean best IoU | best IoU > 0.5 | masks "
        "| seconds | load | other CPU % |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in default["volumes"]:
        lines.append(
            f"| {r['volume']} | {r['modality']} | {'x'.join(map(str, r['shape']))} "
            f"| {r['structures']} | {r['mean_best_iou']:.3f} | {r['frac_above_0_5']:.2f} "
            f"| {r['masks']} | {r['seconds']:.2f} | {r['load_before']:.2f} "
            f"| {r['other_cpu_pct']:.0f} |"
        )
    o = default["overall"]
    lines += [
        f"| **all** | | | {o['structures']} | **{o['mean_best_iou']:.3f}** "
        f"| {o['frac_above_0_5']:.2f} | {o['masks_per_volume']:.1f} "
        f"| {o['seconds_per_volume']:.2f} | | |",
        "",
        f"**128^3 volume** (`{t['volume']}`, preprocessed, centre crop/pad to "
        f"{'x'.join(map(str, t['shape']))}), one SimpleITK thread: **{t['seconds']:.2f} s** "
        f"(median of {len(t['seconds_all'])}: "
        f"{', '.join(f'{s:.2f}' for s in t['seconds_all'])}), {t['masks']} masks; load "
        f"{t['load_before']:.2f}, other CPU {t['other_cpu_pct']:.0f}%.",
        "",
        "**Other configurations** (pooled over the same structures):",
        "",
        "| configuration | mean best IoU | best IoU > 0.5 | masks per volume "
        "| seconds per volume |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        o = run["overall"]
        lines.append(
            f"| {run['name']} | {o['mean_best_iou']:.3f} | {o['frac_above_0_5']:.2f} "
            f"| {o['masks_per_volume']:.1f} | {o['seconds_per_volume']:.2f} |"
        )
    if report.get("sweep"):
        d = default["config"]
        lines += [
            "",
            "**Sensitivity** of the default's merge weights (pooled mean best IoU; the default, "
            f"size power {d['merge_size_power']} and edge weight {d['merge_edge_weight']}, was "
            "chosen on these same structures, so its row above is optimistic by about the spread "
            "of its neighbours here):",
            "",
            "| size power / edge weight | " + " | ".join(str(w) for w in SWEEP_EDGE_WEIGHT) + " |",
            "|---|" + "---:|" * len(SWEEP_EDGE_WEIGHT),
        ]
        for p in SWEEP_SIZE_POWER:
            cells = [
                f"{r['mean_best_iou']:.3f}" for r in report["sweep"] if r["merge_size_power"] == p
            ]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    aim = report["aim"]
    verdict = []
    verdict.append(
        f"mean best IoU {default['overall']['mean_best_iou']:.3f} "
        + ("meets" if aim["iou_met"] else "does **not** meet")
        + f" the aim of {aim['mean_best_iou']}"
    )
    verdict.append(
        f"{t['seconds']:.2f} s per 128^3 volume "
        + ("meets" if aim["seconds_met"] else "does **not** meet")
        + f" the aim of < {aim['seconds_128']} s on one core"
    )
    ts = report.get("timing_128_sam2")
    if ts:
        lines += [
            "",
            f"**SAM2 on the 128^3 volume** (`{ts['checkpoint']}`, on "
            f"{m.get('sam2_device')}): **{ts['seconds']:.2f} s**, {ts['masks']} masks.",
        ]
    lines += ["", "Aim: " + "; ".join(verdict) + ".", ""]
    return "\n".join(lines)
