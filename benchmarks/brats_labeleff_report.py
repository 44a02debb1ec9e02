"""The BraTS label-efficiency runs summarised, as Markdown, as files and as suite numbers.

The payload is :func:`omnienc.benchmarks.brats_labeleff.run_brats_label_efficiency`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.benchmarks.brats_labeleff_cases import REGION_KEYS, SCORED_REGIONS, case_bootstrap
from omnienc.benchmarks.report import write_report

METHOD_LABELS = {
    "frozen": "**pretrained**, frozen + decoder",
    "finetune": "**pretrained**, fine-tuned",
    "scratch": "random-init, trained from scratch",
    "frozen_random": "random-init, frozen + decoder (floor)",
}
REGION_TITLES = {"whole_tumour": "Whole tumour", "tumour_core": "Tumour core"}


def _cases_word(n: int | str) -> str:
    return f"{n} case" if int(n) == 1 else f"{n} cases"


def summarize(runs: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Mean Dice per method, number of cases and region, its spread and case interval.

    Args:
        runs: The payload's runs (``method``, ``n_train``, ``rotation``, ``dice``:
            ``{test case: {region: value or None}}``).
        seed: Seeds the bootstrap.

    Returns:
        ``{method: {str(n): {region: {"mean", "sd", "rotation_means", "n_rotations",
        "n_test_cases", "ci"} or None}}}``: ``mean`` over rotations of each rotation's mean over
        its test cases, ``sd`` the sample SD over rotations (``None`` for one rotation), ``ci``
        the 95% bootstrap interval over distinct test cases (``None`` below 3 cases).
    """
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(run["method"], {}).setdefault(str(run["n_train"]), []).append(run)
    return {
        method: {
            n: {region: _region_stats(rows, region, seed) for region in SCORED_REGIONS}
            for n, rows in by_n.items()
        }
        for method, by_n in groups.items()
    }


def _region_stats(rows: Sequence[dict[str, Any]], region: str, seed: int) -> dict[str, Any] | None:
    """One region's statistics over the rotations ``rows`` of one method and number of cases."""
    rot_means: list[float] = []
    per_case: dict[str, list[float]] = {}
    for row in rows:
        values = {c: d[region] for c, d in row["dice"].items() if d[region] is not None}
        if values:
            rot_means.append(float(np.mean(list(values.values()))))
        for case, value in values.items():
            per_case.setdefault(case, []).append(value)
    if not rot_means:
        return None
    ci = case_bootstrap(per_case, seed=seed)
    return {
        "mean": float(np.mean(rot_means)),
        "sd": float(np.std(rot_means, ddof=1)) if len(rot_means) > 1 else None,
        "rotation_means": rot_means,
        "n_rotations": len(rot_means),
        "n_test_cases": len(per_case),
        "ci": list(ci) if ci else None,
    }


def run_line(run: dict[str, Any]) -> str:
    """One line for a finished run: method, cases, rotation, mean Dice of each region."""
    means = {
        REGION_KEYS[r]: np.mean([d[r] for d in run["dice"].values() if d[r] is not None] or [0.0])
        for r in SCORED_REGIONS
    }
    return (
        f"brats labeleff | {run['method']:<13} {run['n_train']} case(s), rotation "
        f"{run['rotation']} (train {'+'.join(run['train'])}): WT {means['wt']:.3f} "
        f"TC {means['tc']:.3f} ({run['train_seconds'] + run['eval_seconds']:.0f} s)"
    )


def metric_key(region: str, n_train: int | str) -> str:
    """Stable summary key, e.g. ``brats_wt_dice_1case``, ``brats_tc_dice_3cases``."""
    return f"brats_{REGION_KEYS[region]}_dice_{_cases_word(n_train).replace(' ', '')}"


def summary_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """Mean Dice of the frozen encoder (``KEY``) and of its random-init floor (``KEY_floor``).

    ``KEY`` is :func:`metric_key`'s, one per scored region and number of labelled cases that
    the payload has (quick mode: 1 and 3 cases).
    """
    out: dict[str, float] = {}
    for method, suffix in (("frozen", ""), ("frozen_random", "_floor")):
        for n, cell in payload["summary"].get(method, {}).items():
            for region in SCORED_REGIONS:
                if cell.get(region) is not None:
                    out[metric_key(region, n) + suffix] = float(cell[region]["mean"])
    return out


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "–"
    text = f"{stats['mean']:.3f}"
    if stats["sd"] is not None:
        text += f" ± {stats['sd']:.3f}"
    if stats["ci"] is not None:
        text += f" [{stats['ci'][0]:.2f}, {stats['ci'][1]:.2f}]"
    return text


def _hashes(files: dict[str, str]) -> str:
    return ", ".join(f"{k.split('/')[-1]} `{v[:12]}…`" for k, v in files.items())


def _rotation_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for n in sorted({r["n_train"] for r in payload["rotations"]}):
        rots = [r for r in payload["rotations"] if r["n_train"] == n]
        lines.append(
            f"* {_cases_word(n)}: "
            + "; ".join(
                f"train {' + '.join(r['train'])} → test {', '.join(r['test'])}" for r in rots
            )
        )
    return lines


def format_brats_label_efficiency_markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: protocol, one table per region, and the time taken."""
    plan, enc, machine, secs = (payload[k] for k in ("plan", "encoder", "machine", "seconds"))
    ns = sorted({int(n) for cell in payload["summary"].values() for n in cell})
    data = ", ".join(f"`{c['name']}` ({_hashes(c['files'])})" for c in payload["cases"])
    mode = "quick mode" if payload["quick"] else "full"
    lines = [
        "# BraTS label efficiency: tumour segmentation from 1, 2 and 3 labelled cases",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {machine.get('cpu')}, {machine.get('torch_threads')} torch threads, GPU: "
        f"{machine.get('gpu') or 'none'}; {machine.get('date')}; {mode}: "
        f"{secs['total'] / 60:.1f} min wall ({secs['own_cpu'] / 60:.1f} min of this process's "
        f"CPU; reading and preprocessing the cases once: {secs['prepare']:.0f} s).  ",
        f"Encoder: `{enc['source']}` ({enc['arch']}, `{enc['checkpoint'][:19]}…`); floor: "
        f"{payload['floor']}.  ",
        f"Data: {len(payload['cases'])} BraTS 2013 cases (DeepMedic's copy; sha256 of the files "
        f"used): {data}.",
        "",
        f"**Input: {payload['sequence'].upper()} only** (`Flair_subtrMeanDivStd`, one channel), "
        f"with the encoder's preprocessing ({plan_spacing(payload)} mm, percentile clip + "
        "z-score, cropped to the brain). One decoder, three nested classes: 0 background, 1 "
        "whole tumour outside the core (oedema, label 2), 2 tumour core; **whole tumour** "
        f"(labels {_labels(payload, 'whole_tumour')}) = class 1 or 2, **tumour core** (labels "
        f"{_labels(payload, 'tumour_core')}) = class 2. Dice on each test case's "
        f"**{payload['dice_grid'].split(' (')[0]} 1 mm grid** (240 x 240 x 155): the 2 mm "
        "probabilities resampled trilinearly, then argmax.",
        "",
        f"Each run: {payload['budget']['text']} of {plan['batch_size']} class-balanced crops of "
        f"{'x'.join(map(str, plan['crop_size']))} (every method, every number of cases: the CT "
        f"segmentation benchmark's rule), decoder width {plan['width']}, AdamW lr "
        f"{plan['lr']:g}; fine-tuning at encoder lr x{plan['encoder_lr_scale']:g}, from scratch "
        "at x1; no validation, nothing chosen on the test cases. Rotations (seeded; a test case "
        "is never in its training set):",
        "",
        *_rotation_lines(payload),
        "",
        "Cell: mean Dice over rotations (each rotation's mean over its test cases) ± sample SD "
        "over rotations [95% bootstrap interval over the distinct test cases, each the mean of "
        "the rotations that tested it; shown from 3 cases up].",
    ]
    for region in SCORED_REGIONS:
        lines += [
            "",
            f"## {REGION_TITLES[region]}",
            "",
            "| method | " + " | ".join(_header(payload, n) for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for method in payload["methods"]:
            cells = payload["summary"].get(method, {})
            lines.append(
                f"| {METHOD_LABELS[method]} | "
                + " | ".join(_cell((cells.get(str(n)) or {}).get(region)) for n in ns)
                + " |"
            )
    lines += ["", "Seconds per run (training + native-grid scoring of its test cases):", ""]
    for method in payload["methods"]:
        rows = [r for r in payload["runs"] if r["method"] == method]
        lines.append(
            f"* {METHOD_LABELS[method]}: "
            + ", ".join(
                f"{_cases_word(n)} {sum(r['train_seconds'] for r in sel) / len(sel):.0f} + "
                f"{sum(r['eval_seconds'] for r in sel) / len(sel):.0f}"
                for n in ns
                if (sel := [r for r in rows if r["n_train"] == n])
            )
        )
    return "\n".join(lines) + "\n"


def plan_spacing(payload: dict[str, Any]) -> str:
    """The preprocessing spacing as ``2 x 2 x 2`` (or ``native``)."""
    spacing = payload["preprocessing"].get("spacing")
    return "native" if spacing is None else " x ".join(f"{s:g}" for s in spacing)


def _labels(payload: dict[str, Any], region: str) -> str:
    return ", ".join(str(v) for v in payload["regions"][region])


def _header(payload: dict[str, Any], n: int) -> str:
    rots = {r["index"] for r in payload["rotations"] if r["n_train"] == n}
    return f"{_cases_word(n)} ({len(rots)} rot.)"


def write_brats_label_efficiency(payload: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``out.json`` (the payload) and ``out.md`` atomically; return both paths.

    Args:
        payload: The job's payload.
        out: Results path without suffix, e.g. ``benchmarks/results/bench/brats_labeleff``.
    """
    markdown = format_brats_label_efficiency_markdown(payload)
    return write_report(Path(out), payload, markdown, newline=True)
