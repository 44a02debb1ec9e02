"""The classification benchmark's tables: one Markdown table per data set, beside the anchors.

:func:`format_markdown` writes the rows of
:func:`~omnienc.benchmarks.classification.run_classification` (every method at every label
fraction, the random-init floor beside the encoder under test, the published anchors with their
citation); :func:`write_results` writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnienc.benchmarks.anchors import ANCHORS, CITATION
from omnienc.benchmarks.classification import EndToEndBudget
from omnienc.benchmarks.report import write_report


def _budget_text(payload: dict[str, Any]) -> str:
    """The end-to-end budget of a payload, with the steps each fraction got."""
    if "budget" not in payload:  # payloads written before EndToEndBudget
        return f"{payload['finetune']['steps']} steps"
    text = EndToEndBudget(**payload["budget"]).describe()
    steps = {r["fraction"]: r["steps"] for r in payload["rows"] if "steps" in r}
    if steps and payload["budget"]["steps"] is None:
        text += " (" + ", ".join(f"{100 * f:g}%: {n}" for f, n in sorted(steps.items())) + ")"
    return text


def _task_text(payload: dict[str, Any]) -> str:
    """The INFO task, and how a set of more than two classes is scored."""
    task, n_classes = payload["task"], payload.get("n_classes", 2)
    if task.startswith("multi-label") or n_classes <= 2:
        return task
    return f"{task}, {n_classes} classes, scored as multi-class: macro one-vs-rest AUC, argmax ACC"


def _fmt(row: dict[str, Any] | None, metric: str = "auc") -> str:
    if row is None:
        return "–"
    value = row["metrics"][metric]
    lo, hi = row["intervals"].get(metric, (float("nan"), float("nan")))
    spread = row.get("spread", {}).get(metric)
    text = f"{value:.3f} [{lo:.2f}, {hi:.2f}]"
    return text + (f" ±{spread:.3f}" if spread is not None else "")


METHOD_NAMES = {
    "linear": "linear probe (frozen)",
    "knn": "kNN, cosine (frozen)",
    "attention": "attention-pool head (frozen)",
    "scratch": "supervised from scratch (end-to-end)",
    "finetune": "fine-tuned (end-to-end)",
}


def format_markdown(
    payloads: Sequence[dict[str, Any]], command: str, title: str = "Classification benchmark"
) -> str:
    """The Markdown report of one or more datasets' payloads."""
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
    ]
    if payloads:
        machine = payloads[0].get("machine", {})
        lines += [
            f"Machine: {machine.get('cpu')}, {machine.get('torch_threads')} torch threads, "
            f"GPU: {machine.get('gpu') or 'none'}; {machine.get('date')}",
            "",
            "Test-split AUC with its bootstrap 95% interval (attention head: mean of "
            f"{len(payloads[0]['head_seeds'])} seeds, ± their standard deviation). Each column "
            "trains on that fraction of the training labels (stratified, seed 0; at least one "
            "item per class); validation and test splits are whole. `pretrained` is the encoder "
            "under test, `random-init` a random-init encoder of the same shape.",
        ]
    for p in payloads:
        fracs = p["fractions"]
        ft = p["finetune"]
        lines += [
            "",
            f"## {p['dataset']} {p['size']} ({_task_text(p)}; train/val/test "
            f"{p['n']['train']}/{p['n']['val']}/{p['n']['test']})",
            "",
            f"Encoder: `{p['encoder']['source']}` ({p['encoder']['arch']}, "
            f"`{p['encoder']['checkpoint'][:19]}…`); data: "
            + ", ".join(f"`{k}` sha256 `{v[:12]}…`" for k, v in p["data_files"].items())
            + f"; {p['seconds'] / 60:.1f} min in all.",
            f"End-to-end budget: {_budget_text(p)} of batch {ft['batch_size']}, AdamW lr "
            f"{ft['lr']:g} (fine-tuning: encoder lr x{ft['encoder_lr_scale']:g}), random flips, "
            "best step on validation AUC.",
            "",
            "| encoder | method | "
            + " | ".join(
                f"AUC, {100 * f:g}% (n={sum(p['train_label_counts'][str(f)].values())})"
                for f in fracs
            )
            + " | ACC, 100% |",
            "|---|---|" + "---|" * (len(fracs) + 1),
        ]
        keys = []
        for r in p["rows"]:
            if (r["encoder"], r["method"]) not in keys:
                keys.append((r["encoder"], r["method"]))
        for enc, method in keys:
            by_f = {
                r["fraction"]: r for r in p["rows"] if r["encoder"] == enc and r["method"] == method
            }
            bold = "**" if enc == "pretrained" else ""
            lines.append(
                f"| {bold}{enc}{bold} | {METHOD_NAMES[method]} | "
                + " | ".join(_fmt(by_f.get(f)) for f in fracs)
                + f" | {_fmt(by_f.get(1.0), 'acc') if 1.0 in by_f else '–'} |"
            )
        anchors = ANCHORS.get((p["dataset"], p["size"]), [])
        if anchors:
            lines += [
                "",
                f"Published anchors, 100% of the labels (not re-run here; {CITATION}):",
                "",
                "| model | AUC | ACC | source we read it from |",
                "|---|---:|---:|---|",
            ]
            lines += [f"| {a.model} | {a.auc:.3f} | {a.acc:.3f} | {a.source} |" for a in anchors]
    return "\n".join(lines) + "\n"


def write_results(
    payloads: Sequence[dict[str, Any]],
    out: Path,
    command: str,
    segmentation: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``OUT.json`` and ``OUT.md`` atomically; return both paths.

    Args:
        payloads: :func:`~omnienc.benchmarks.classification.run_classification` results (may
            be empty).
        out: Path without suffix.
        command: The command that made them.
        segmentation: A :func:`omnienc.benchmarks.segmentation.run_segmentation_suite` result.
    """
    from omnienc.benchmarks.segmentation import format_segmentation_markdown

    doc: dict[str, Any] = {"command": command, "results": list(payloads)}
    title = "Benchmarks" if segmentation is not None else "Classification benchmark"
    text = (
        format_markdown(payloads, command, title)
        if payloads
        else f"# Benchmark\n\nCommand: `{command}`\n"
    )
    if segmentation is not None:
        doc["segmentation"] = segmentation
        text += "\n" + format_segmentation_markdown(segmentation)
    return write_report(out, doc, text)
