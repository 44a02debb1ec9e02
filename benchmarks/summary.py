"""Scores of the evaluation suite, one table per encoder, and the noise rule that ranks recipes.

Per task: the metric, the random-init floor, the gain over the floor and the *normalised gain*
``(metric - floor) / (1 - floor)`` (the share of the distance from the floor to a perfect score
that pretraining covered); per encoder one number, the mean normalised gain over the tasks.
Across several encoders of one recipe (pretraining seeds): the SD of every metric and of the
summary, and the smallest difference the suite can call (:func:`callable_difference`). The
suite itself runs in :mod:`omnienc.benchmarks.suite` (``omnienc bench summary``).

Tasks (each from its own benchmark module, the same code ``omnienc bench all`` runs):

* MedMNIST frozen linear probes at 100% of the labels (AUC): AdrenalMNIST3D 28, BreastMNIST 28,
  RetinaMNIST 28 (multi-class, macro one-vs-rest);
* CT segmentation: the frozen decoder, mean Dice on another CT (:mod:`.segmentation`);
* few-shot in-context segmentation across scans (:mod:`.fewshot`);
* BraTS tumour vs tumour-free crops, leave-one-case-out linear probe (:mod:`.brats_classify`);
* BraTS label efficiency of the frozen decoder (:mod:`.brats_labeleff`).

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.benchmarks.fewshot_windows import differing_windows
from omnienc.benchmarks.report import write_report

# Two-sided 95% normal quantile, for the difference of two recipes' means.
Z95 = 1.96


@dataclass(frozen=True)
class SuiteScore:
    """One task's headline metric for an encoder and for its random-init floor.

    Attributes:
        task: Stable key, e.g. ``adrenalmnist3d_28_linear_auc``.
        label: What it measures, for tables.
        metric: ``AUC`` or ``Dice`` (both in [0, 1], 1 best).
        value: The encoder's score.
        floor: The random-init encoder's score (``None`` when the task has no floor).
    """

    task: str
    label: str
    metric: str
    value: float
    floor: float | None

    @property
    def gain(self) -> float | None:
        """``value - floor``."""
        return None if self.floor is None else self.value - self.floor

    @property
    def normalised_gain(self) -> float | None:
        """``(value - floor) / (1 - floor)``: 1 is a perfect score, 0 the floor, < 0 below it."""
        if self.floor is None or not math.isfinite(self.value) or self.floor >= 1.0:
            return None
        return (self.value - self.floor) / (1.0 - self.floor)


def mean_normalised_gain(scores: Sequence[SuiteScore]) -> float:
    """The single summary number: the mean of the tasks' normalised gains (NaN if none)."""
    gains = [g for s in scores if (g := s.normalised_gain) is not None]
    return float(np.mean(gains)) if gains else float("nan")


def callable_difference(sd: float, n_a: int = 1, n_b: int = 1, z: float = Z95) -> float:
    """Smallest difference of two recipes' mean scores that is not seed noise.

    With ``n_a`` and ``n_b`` pretraining seeds per recipe and a seed SD of ``sd`` (measured on
    one recipe, assumed shared), the difference of the two means has SD
    ``sd * sqrt(1/n_a + 1/n_b)``; a difference beyond ``z`` times that (95%, two-sided) is
    called. One seed each: ``2.77 sd``; three seeds each: ``1.60 sd``.
    """
    return z * sd * math.sqrt(1.0 / n_a + 1.0 / n_b)


# ------------------------------------------------------------------- scores of each payload


def scores_from_classification(payload: dict[str, Any]) -> list[SuiteScore]:
    """The frozen linear probe's AUC at 100% of the labels, encoder and floor."""
    rows = {
        r["encoder"]: r
        for r in payload["rows"]
        if r["method"] == "linear" and float(r["fraction"]) == 1.0
    }
    if "pretrained" not in rows and "random-init" not in rows:
        return []
    enc = rows.get("pretrained") or rows["random-init"]
    floor = rows.get("random-init") if "pretrained" in rows else None
    flag, size = payload["dataset"], payload["size"]
    return [
        SuiteScore(
            f"{flag}_{size}_linear_auc",
            f"{flag} {size}: frozen linear probe, 100% labels",
            "AUC",
            float(enc["metrics"]["auc"]),
            None if floor is None else float(floor["metrics"]["auc"]),
        )
    ]


def scores_from_segmentation(suite: dict[str, Any]) -> list[SuiteScore]:
    """The frozen decoder's mean Dice on the held-out CT, encoder and floor."""
    benches = suite["benchmarks"]

    def frozen_mean(payload: dict[str, Any]) -> float:
        return float(payload["summary"]["frozen"]["mean"]["mean"])

    floor = frozen_mean(benches[1]) if len(benches) > 1 else None
    return [
        SuiteScore(
            "ct_segmentation_frozen_dice",
            "CT segmentation: frozen decoder, mean Dice on another CT",
            "Dice",
            frozen_mean(benches[0]),
            floor,
        )
    ]


def scores_from_pairs(metrics: dict[str, float], labels: dict[str, str]) -> list[SuiteScore]:
    """Scores from a benchmark's ``summary_metrics``: ``KEY`` and ``KEY_floor`` entries.

    Args:
        metrics: ``{"KEY": value, "KEY_floor": floor value, ...}``.
        labels: ``{"KEY": "what it measures"}``; keys without a label are left out.
    """
    out = []
    for key, label in labels.items():
        if key not in metrics or not math.isfinite(metrics[key]):
            continue
        metric = "AUC" if key.endswith("auc") else "Dice"
        floor = metrics.get(f"{key}_floor")
        out.append(SuiteScore(key, label, metric, float(metrics[key]), floor))
    return out


# ---------------------------------------------------------------------- across encoders


def scores_of(payload: dict[str, Any]) -> list[SuiteScore]:
    """The :class:`SuiteScore` list of a :func:`run_suite` payload."""
    return [SuiteScore(**s) for s in payload["scores"]]


def aggregate(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and SD across encoders (e.g. pretraining seeds of one recipe) of every score.

    Returns:
        ``{"n", "tasks": {task: {"mean", "sd", "min", "max", "floor"}}, "summary": {"mean",
        "sd"}, "callable_1v1", "callable_3v3"}``: SDs are sample SDs (ddof 1), and the two
        callable differences apply :func:`callable_difference` to the summary's SD.
    """
    tasks: dict[str, list[float]] = {}
    floors: dict[str, float | None] = {}
    for payload in payloads:
        for s in scores_of(payload):
            tasks.setdefault(s.task, []).append(s.value)
            floors[s.task] = s.floor
    summary = [float(p["mean_normalised_gain"]) for p in payloads]
    ddof = 1 if len(payloads) > 1 else 0
    sd = float(np.std(summary, ddof=ddof))
    return {
        "n": len(payloads),
        "tasks": {
            t: {
                "mean": float(np.mean(v)),
                "sd": float(np.std(v, ddof=ddof)) if len(v) > 1 else float("nan"),
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "floor": floors[t],
            }
            for t, v in tasks.items()
        },
        "summary": {"mean": float(np.mean(summary)), "sd": sd},
        "callable_1v1": callable_difference(sd, 1, 1),
        "callable_3v3": callable_difference(sd, 3, 3),
    }


def _f(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _tasks(payload: dict[str, Any]) -> set[str]:
    return {s.task for s in scores_of(payload) if s.normalised_gain is not None}


def _summary_over(payload: dict[str, Any], tasks: set[str]) -> float:
    return mean_normalised_gain([s for s in scores_of(payload) if s.task in tasks])


def compare(
    payload: dict[str, Any], seeds: Sequence[dict[str, Any]], seed_sd: float | None = None
) -> dict[str, Any]:
    """One encoder's mean normalised gain against the mean of a recipe's seeds, with the rule.

    Both sides are summarised over the tasks they share: an encoder without an in-context head
    (the MONAI SSL peer) has no few-shot head tasks, and a mean over 9 tasks says nothing
    against a mean over 11. When the task sets differ, the seeds' SD, the bar and the
    difference are all recomputed over the shared tasks.

    Args:
        payload: The other encoder's suite payload.
        seeds: Suite payloads of one recipe's pretraining seeds (one is allowed with
            ``seed_sd``).
        seed_sd: An SD of the mean normalised gain across pretraining seeds measured elsewhere
            (a single run has none of its own); used instead of the seeds' own SD.

    Returns:
        ``{"encoder", "tasks" (the number of shared tasks), "left_out" (tasks of either side
        not in the comparison), "value", "seeds_mean", "difference", "callable", "seed_sd",
        "verdict", "warning"}``: ``seed_sd`` is the SD the bar used (``seed_sd`` when given,
        else the seeds' own over the shared tasks), ``callable`` is
        :func:`callable_difference` of it with 1 vs ``len(seeds)`` seeds; the verdict is
        ``ahead``, ``behind`` or ``level within seed noise``; ``warning`` names differing
        few-shot windows (:func:`.fewshot_windows.differing_windows`) when few-shot tasks are
        compared, else ``None``.

    Raises:
        ValueError: The encoder shares no scored task with the seeds.
    """
    mine = _tasks(payload)
    theirs = set.intersection(*(_tasks(p) for p in seeds))
    shared = mine & theirs
    if not shared:
        raise ValueError(f"{payload['encoder']} shares no scored task with the seeds")
    values = [_summary_over(p, shared) for p in seeds]
    if seed_sd is not None:
        sd = float(seed_sd)
    elif len(values) > 1:
        sd = float(np.std(values, ddof=1))
    else:
        raise ValueError("one seed has no SD of its own: give seed_sd, measured elsewhere")
    value = _summary_over(payload, shared)
    diff = value - float(np.mean(values))
    bar = callable_difference(sd, 1, len(seeds))
    verdict = "level within seed noise" if abs(diff) <= bar else "ahead" if diff > 0 else "behind"
    windows = differing_windows([payload, *seeds])
    warning = None
    if windows and any(t.startswith("fewshot_") for t in shared):
        warning = (
            f"few-shot windows differ ({'; '.join(windows)}): the few-shot cells of "
            f"{payload['encoder']} and the seeds were not scored alike"
        )
    return {
        "encoder": payload["encoder"],
        "tasks": len(shared),
        "left_out": sorted((mine | theirs) - shared),
        "value": value,
        "seeds_mean": float(np.mean(values)),
        "difference": diff,
        "callable": bar,
        "seed_sd": sd,
        "verdict": verdict,
        "warning": warning,
    }


def format_summary_markdown(
    payloads: Sequence[dict[str, Any]],
    command: str,
    compared: Sequence[dict[str, Any]] = (),
    seed_sd: float | None = None,
    comparisons: Sequence[dict[str, Any]] | None = None,
) -> str:
    """One table per encoder, the spread across ``payloads`` (seeds of one recipe) and the noise
    rule, then each of ``compared`` (other recipes) judged against them by that rule (with
    ``seed_sd`` in place of the seeds' own SD when given, see :func:`compare`).

    ``comparisons`` are the :func:`compare` results of ``compared``, in order, when the caller
    already has them (:func:`write_summary`); they are computed here otherwise."""
    lines = ["# Evaluation suite summary", "", f"Command: `{command}`", ""]
    for payload in [*payloads, *compared]:
        minutes = payload["total_seconds"] / 60
        mode = "quick" if payload["plan"]["quick"] else "full"
        lines += [
            f"## `{payload['encoder']}` ({mode} suite, {minutes:.1f} min)",
            "",
            "| task | metric | encoder | random-init floor | gain | normalised gain |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for s in scores_of(payload):
            lines.append(
                f"| {s.label} | {s.metric} | {s.value:.3f} | {_f(s.floor)} | {_f(s.gain)} | "
                f"{_f(s.normalised_gain)} |"
            )
        lines += [
            f"| **mean normalised gain** | | | | | **{_f(payload['mean_normalised_gain'])}** |",
            "",
        ]
    if len(payloads) > 1:
        agg = aggregate(payloads)
        lines += [
            f"## Across the {agg['n']} encoders (mean ± sample SD)",
            "",
            "| task | mean ± SD | min .. max | floor |",
            "|---|---:|---:|---:|",
        ]
        for task, t in agg["tasks"].items():
            lines.append(
                f"| {task} | {t['mean']:.3f} ± {_f(t['sd'])} | {t['min']:.3f} .. "
                f"{t['max']:.3f} | {_f(t['floor'])} |"
            )
        s = agg["summary"]
        lines += [
            f"| **mean normalised gain** | **{s['mean']:.3f} ± {s['sd']:.3f}** | | |",
            "",
            f"Noise rule: with this SD of the mean normalised gain across pretraining seeds, two "
            f"recipes differ beyond seed noise (95%, two-sided) when their summaries differ by "
            f"more than **{agg['callable_1v1']:.3f}** with one seed each, or "
            f"**{agg['callable_3v3']:.3f}** with the mean of three seeds each "
            f"(`omnienc.benchmarks.summary.callable_difference`). An SD from {agg['n']} seeds is "
            "itself uncertain: treat these bars as a first estimate.",
            "",
        ]
        windows = differing_windows(payloads)
        if windows:
            lines += [
                f"Warning: these encoders' few-shot windows differ ({'; '.join(windows)}): their "
                "few-shot cells were not scored alike.",
                "",
            ]
    if compared and len(payloads) == 1 and seed_sd is None:
        lines += [
            "No verdict on the other encoders: one `--encoder` run has no seed SD of its own "
            "(give `--seed-sd`, measured elsewhere).",
            "",
        ]
    elif compared:
        n = len(payloads)
        sd_from = (
            f"seed SD {seed_sd:.3f}, given (`--seed-sd`)"
            if seed_sd is not None
            else "the seeds' SD recomputed over them when a task is left out"
        )
        lines += [
            f"## Other encoders against the mean of these {n}",
            "",
            f"Each row is summarised over the tasks both sides have ({sd_from}).",
            "",
            "| encoder | tasks | mean normalised gain | seeds' mean | difference | "
            f"callable (1 vs {n} seeds) | verdict | left out |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        if comparisons is None:
            comparisons = [compare(other, payloads, seed_sd) for other in compared]
        for c in comparisons:
            left = ", ".join(c["left_out"]) or "–"
            lines.append(
                f"| `{c['encoder']}` | {c['tasks']} | {c['value']:.3f} | "
                f"{c['seeds_mean']:.3f} | {c['difference']:+.3f} | {c['callable']:.3f} | "
                f"{c['verdict']} | {left} |"
            )
        lines.append("")
        for c in comparisons:
            if c.get("warning"):
                lines += [f"Warning: {c['warning']}.", ""]
    return "\n".join(lines)


def write_summary(
    payloads: Sequence[dict[str, Any]],
    out: Path,
    command: str,
    compared: Sequence[dict[str, Any]] = (),
    seed_sd: float | None = None,
) -> tuple[Path, Path]:
    """Write ``out.json`` (payloads, aggregate, comparisons, command) and ``out.md``.

    ``compared`` are judged against ``payloads`` when there are several of them or ``seed_sd``
    is given (see :func:`compare`).
    """
    body: dict[str, Any] = {"command": command, "encoders": list(payloads)}
    if len(payloads) > 1:
        body["aggregate"] = aggregate(payloads)
    comparisons = None
    if len(payloads) > 1 or seed_sd is not None:
        comparisons = [compare(c, payloads, seed_sd) for c in compared]
        body["compared"] = [{**c, **r} for c, r in zip(compared, comparisons, strict=True)]
    text = format_summary_markdown(payloads, command, compared, seed_sd, comparisons)
    return write_report(out, body, text)
