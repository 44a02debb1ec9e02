"""The report of the BraTS crop-classification benchmark: Markdown, files, summary numbers.

Reads the payload :func:`omnienc.benchmarks.brats_classify.run_brats_classification` returns;
:mod:`omnienc.benchmarks.brats_classify` re-exports every public name here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.benchmarks.brats_crops import CaseCrops, PreparedCase
from omnienc.benchmarks.report import write_report
from omnienc.checkpoint import file_sha256

SEQUENCE_NAMES = {"flair": "FLAIR", "t1c": "T1c"}
METHOD_NAMES = {
    "linear": "linear probe (frozen)",
    "scratch": "supervised from scratch (end-to-end)",
    "intensity": "intensity statistics + logistic regression",
}


def data_files(
    root: Path, prepared: Sequence[PreparedCase], sequences: Sequence[str], extra: Sequence[Path]
) -> dict[str, str]:
    """``{path under root: sha256}`` of every case file the crops came from, then ``extra``."""
    files = [
        path
        for p in prepared
        for path in (
            *(p.case.image_path(s) for s in sequences),
            p.case.label_path,
            p.case.brain_mask_path,
        )
    ]
    return {str(f.relative_to(root)): file_sha256(f) for f in [*files, *extra]}


def case_facts(prepared: PreparedCase, crops: CaseCrops) -> dict[str, Any]:
    """Counts and mean brain / tumour shares of one case's crops, for the report."""
    tumour = crops.labels == 1

    def mean(values: np.ndarray) -> float:
        return round(float(values.mean()), 3)

    return {
        "case": crops.case,
        "crops": {"tumour": int(tumour.sum()), "tumour-free": int((~tumour).sum())},
        "brain_fraction": {
            "tumour": mean(crops.brain_fraction[tumour]),
            "tumour-free": mean(crops.brain_fraction[~tumour]),
        },
        "tumour_fraction_of_tumour_crops": mean(crops.tumour_fraction[tumour]),
        "tumour_voxels": int(prepared.tumour.sum()),
        "brain_voxels": int(prepared.brain.sum()),
    }


def _auc_text(row: dict[str, Any]) -> str:
    """``AUC [low, high]``, with ``±SD (K seeds)`` for several seeds."""
    lo, hi = row["interval"]
    text = f"{row['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    if row.get("spread") is not None:
        text += f" ±{row['spread']:.3f} ({len(row['seed_aucs'])} seeds)"
    return text


def _header(p: dict[str, Any]) -> list[str]:
    """Command, machine, time, encoder and the crop rules."""
    m, s, sec = p["machine"], p["sampling"], p["seconds"]
    enc, pre = p["encoder"], p["preprocessing"]
    size = "x".join(map(str, s["crop_size"]))
    spacing = pre["spacing"] or (1.0, 1.0, 1.0)
    mm = "x".join(f"{n * v:g}" for n, v in zip(s["crop_size"], spacing, strict=True))
    return [
        "# BraTS: tumour vs tumour-free brain crops, frozen encoder, leave-one-case-out",
        "",
        f"Command: `{p['command']}`  ",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, GPU: {m['gpu'] or 'none'}; "
        f"{m['date']}; load average {m['load_average'][0]:.1f} at the start and "
        f"{m['load_average'][1]:.1f} at the end (other jobs shared the CPUs).  ",
        f"Time: {sec['total']:.0f} s in all{' (quick mode)' if p['quick'] else ''}: reading and "
        f"preprocessing {sec['prepare']:.0f} s, features {sec['features']:.0f} s, probes "
        f"{sec['probes']:.0f} s, from-scratch training {sec['scratch']:.0f} s; this process used "
        f"{sec['process_cpu']:.0f} CPU-seconds, other processes {sec['others_cpu']:.0f}.",
        "",
        f"Encoder: `{enc['source']}` ({enc['arch']}, `{enc['checkpoint'][:19]}…`); "
        f"preprocessing: the checkpoint's ({pre['spacing']} mm, percentile clip "
        f"{pre['percentiles']}, z-score) without its foreground crop and final pad/crop, as "
        "few-shot segmentation does. "
        f"Crops: {size} voxels ({mm} mm, the encoder's crop size) on that grid, "
        f"{s['per_class']} per class per case. **tumour**: centre voxel in the whole tumour "
        "(labels 1-4). **tumour-free**: centre in the brain mask, no tumour voxel in the crop. "
        f"Both at least {s['min_brain_fraction']:.0%} brain; centres of one class at least "
        f"{s['min_distance']:g} voxels apart (a greedy draw in a seeded random order, seed "
        f"{s['seed']}); tumour centres weighted so that their brain fractions follow the "
        "tumour-free candidates' (tumour-free crops keep clear of the tumour, at the edge of the "
        "brain, and would otherwise show more background).",
    ]


def _methods(p: dict[str, Any]) -> str:
    """What each row is, in one paragraph."""
    b, sb = p["budget"], p["budget"]["scratch"]
    return (
        "Leave-one-case-out: each case's crops are scored by models trained on the other three "
        "cases' crops only. **Pooled AUC** over the four test folds' scores, with a percentile "
        f"bootstrap 95% interval ({p['bootstrap']}: the crop-level noise within these four "
        "patients; four cases are too few to resample patients), and each fold's AUC. "
        f"*linear*: {p['probe']}. *random-init* linear: encoders of the same shape, untrained "
        f"(seeds {', '.join(map(str, b['floor_seeds']))}; mean ± SD over seeds, the interval "
        "is the seed mean's). *scratch*: the same architecture from random init + a linear "
        f"layer, trained end-to-end with the labels: {sb['steps']} AdamW steps of "
        f"{sb['batch_size']} crops per fold (lr {sb['lr']:g}, {sb['warmup_steps']} warm-up "
        "steps, cosine decay), random flips, the last step scored (seeds "
        f"{', '.join(map(str, b['scratch_seeds']))}). *intensity*: mean, SD and percentiles "
        "5/25/50/75/95 of the crop and of its central cube (a quarter of its side), logistic "
        "regression with the same choice of C."
    )


def format_brats_classification_markdown(payload: dict[str, Any]) -> str:
    """The Markdown report of a benchmark payload."""
    p = payload
    names = [c["case"] for c in p["cases"]]
    lines = [
        *_header(p),
        "",
        "| case | crops tumour / tumour-free | brain fraction tumour / tumour-free | tumour share "
        "of tumour crops | tumour voxels (preprocessed grid) |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in p["cases"]:
        bf = c["brain_fraction"]
        lines.append(
            f"| {c['case']} | {c['crops']['tumour']} / {c['crops']['tumour-free']} | "
            f"{bf['tumour']:.2f} / {bf['tumour-free']:.2f} | "
            f"{c['tumour_fraction_of_tumour_crops']:.2f} | {c['tumour_voxels']} |"
        )
    lines += [
        "",
        _methods(p),
        "",
        "| sequence | encoder | method | pooled AUC [95% CI] | mean of folds | "
        + " | ".join(n.removeprefix("brats_2013_") for n in names)
        + " |",
        "|---|---|---|---|---:|" + "---:|" * len(names),
    ]
    for r in p["rows"]:
        folds = [r["fold_aucs"][n] for n in names]
        bold = "**" if r["encoder"] == "pretrained" else ""
        lines.append(
            f"| {SEQUENCE_NAMES.get(r['sequence'], r['sequence'])} | {bold}{r['encoder']}{bold} "
            f"| {METHOD_NAMES[r['method']]} | {bold}{_auc_text(r)}{bold} | "
            f"{np.mean(folds):.3f} | " + " | ".join(f"{a:.3f}" for a in folds) + " |"
        )
    pyr = p["pyradiomics"]
    volumes = "; ".join(
        f"{k}: {c['shape']} voxels of {c['spacing']} mm, lesion {c['lesion_voxels']} voxels "
        f"({c['lesion_voxels_preprocessed']} on the preprocessed grid), "
        f"{c['lesion_crops']} lesion-centred crops"
        for k, c in pyr["cases"].items()
    )
    lines += [
        "",
        "Shortcut check: a logistic regression on the crop's brain fraction alone reaches a "
        f"pooled AUC of {_auc_text(p['confound'])} (0.5: no shortcut left).",
        "",
        "pyradiomics brain lesions (`volumes/pyradiomics/brain1`, `brain2`): "
        + ("evaluated" if pyr["evaluated"] else f"not evaluated: {pyr['reason']}")
        + (f". {volumes}." if volumes else "."),
        "",
        "Data files (sha256): "
        + ", ".join(f"`{k}` `{v[:12]}`" for k, v in p["data_files"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_brats_classification(payload: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``OUT.json`` and ``OUT.md`` atomically.

    Args:
        payload: A benchmark payload.
        out: The path without suffix, e.g. ``benchmarks/results/bench/brats_classify``.

    Returns:
        The two paths.
    """
    markdown = format_brats_classification_markdown(payload)
    return write_report(Path(out), payload, markdown, allow_nan=False)


def summary_metrics(payload: dict[str, Any]) -> dict[str, float]:
    """Headline numbers for the cross-task summary, under stable names.

    * ``brats_{flair,t1c}_tumour_auc``: the encoder under test's linear probe (pooled AUC);
    * ``brats_{flair,t1c}_tumour_auc_floor``: the random-init floor's (the mean over its seeds;
      absent when the encoder under test is itself random-init);
    * ``brats_{flair,t1c}_intensity_auc``, ``brats_{flair,t1c}_scratch_auc``: the baselines;
    * ``brats_brain_fraction_auc``: the shortcut check.
    """
    out: dict[str, float] = {}
    label = payload["encoder"]["label"]
    for r in payload["rows"]:
        key = f"brats_{r['sequence']}"
        if r["method"] == "linear":
            out[f"{key}_tumour_auc" + ("" if r["encoder"] == label else "_floor")] = r["auc"]
        else:
            out[f"{key}_{r['method']}_auc"] = r["auc"]
    out["brats_brain_fraction_auc"] = payload["confound"]["auc"]
    return out
