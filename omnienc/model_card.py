"""The model card (``README.md``) of an exported encoder, as the Hugging Face Hub reads it.

:func:`render_model_card` writes YAML front matter (``library_name: omnienc``, ``license``,
``tags``, ``pipeline_tag: feature-extraction``) and a body made only of recorded facts:

* the recipe, from the checkpoint's ``config.json`` (pretext method, encoder, steps, crop,
  preprocessing);
* the pretraining data, from the run's resolved ``config.yaml`` when it lies beside the
  checkpoint (``RUN_DIR/config.yaml`` for ``RUN_DIR/encoder``), else "not recorded";
* measured numbers, each table under the exact command that produced it, read from the JSON files
  ``omnienc bench`` writes (``benchmarks/results/bench/*.json``; :func:`read_bench_results`),
  never typed by hand;
* how to load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omnienc.errors import DataError

TAGS = ("medical-imaging", "3d", "self-supervised")
RUN_CONFIG = "config.yaml"


@dataclass
class BenchResult:
    """The numbers of one ``omnienc bench`` results file, as Markdown.

    Attributes:
        path: The JSON file.
        command: The command that wrote it.
        sections: ``(title, markdown table)`` pairs.
        checkpoints: ``sha256:HEX`` of the encoder weights the file records (may be empty).
    """

    path: Path
    command: str
    sections: list[tuple[str, str]]
    checkpoints: list[str]


def find_run_config(checkpoint: Path) -> Path | None:
    """The run's resolved ``config.yaml`` in the checkpoint folder or beside it, if any."""
    for candidate in (checkpoint / RUN_CONFIG, checkpoint.parent / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_run_config(path: Path | None) -> dict[str, Any] | None:
    """Parse a run's ``config.yaml`` (``None`` stays ``None``).

    Raises:
        DataError: The file is not YAML or does not hold a mapping.
    """
    if path is None:
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(path, f"cannot read the run config ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise DataError(path, "the run config does not hold a YAML mapping")
    return doc


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric(row: Mapping[str, Any], key: str) -> str:
    value = row.get("metrics", {}).get(key)
    if value is None:
        return "–"
    lo, hi = row.get("intervals", {}).get(key, (None, None))
    return f"{value:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")


def _classification(payload: Mapping[str, Any]) -> tuple[str, str]:
    title = f"{payload['dataset']} {payload['size']} ({payload.get('task', 'classification')})"
    rows = [
        [
            str(r["encoder"]),
            str(r["method"]),
            f"{100 * float(r['fraction']):g}% (n={r.get('n_train', '?')})",
            _metric(r, "auc"),
            _metric(r, "acc"),
        ]
        for r in payload["rows"]
    ]
    header = ["encoder", "method", "training labels", "test AUC [95% CI]", "test ACC [95% CI]"]
    return title, _table(header, rows)


def _cell(stat: Any) -> str:
    if not isinstance(stat, Mapping):
        return "–"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f} (n={stat['n']})"


def _segmentation(payload: Mapping[str, Any]) -> tuple[str, str]:
    title = f"segmentation, {payload.get('dataset', 'volumes')}: Dice (mean ± sd over seeds)"
    summary = payload["summary"]
    names = [n for n in next(iter(summary.values()), {}) if n != "mean"]
    rows = [
        [str(payload.get("encoder", "?")), mode] + [_cell(s.get(n)) for n in [*names, "mean"]]
        for mode, s in summary.items()
    ]
    return title, _table(["encoder", "mode", *names, "mean"], rows)


def read_bench_results(path: str | Path) -> BenchResult:
    """Read a results JSON written by ``omnienc bench`` into Markdown tables.

    Understands ``bench classification`` / ``all`` (``results[].rows``), ``bench segmentation``
    (``segmentation.benchmarks[].summary``) and ``bench medsegbench`` (``benchmarks[].summary``).

    Raises:
        DataError: The file is missing, not JSON, records no command, or holds no results.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a JSON results file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("command"), str):
        raise DataError(
            path,
            "records no command; pass a JSON file written by `omnienc bench` (with its command)",
        )
    sections: list[tuple[str, str]] = []
    checkpoints: list[str] = []
    try:
        for payload in doc.get("results") or []:
            sections.append(_classification(payload))
            digest = (payload.get("encoder") or {}).get("checkpoint")
            if isinstance(digest, str) and digest.startswith("sha256:"):
                checkpoints.append(digest)
        segmentation = doc.get("segmentation") or doc
        for payload in segmentation.get("benchmarks") or []:
            sections.append(_segmentation(payload))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(path, f"unexpected results layout ({type(exc).__name__}: {exc})") from None
    if not sections:
        raise DataError(
            path,
            "holds no results omnienc export can read (expected results[].rows or "
            "benchmarks[].summary, as `omnienc bench` writes them)",
        )
    return BenchResult(path, doc["command"], sections, checkpoints)


def _recipe(config: Mapping[str, Any]) -> list[str]:
    meta = config.get("meta") or {}
    pre = config.get("preprocessing") or {}
    crop = meta.get("crop_size")
    encoder = ", ".join(f"{k}={v}" for k, v in (config.get("config") or {}).items())
    return [
        f"- pretext method: `{meta.get('pretext', 'not recorded')}`",
        f"- encoder: `{config['arch']}` ({config['family']}: {encoder}); embedding dimension "
        f"{config['embed_dim']}",
        f"- training steps: {meta.get('step', 'not recorded')}",
        f"- crop: {'x'.join(str(c) for c in crop) if crop else 'not recorded'} voxels",
        "- preprocessing (recorded in config.json; `omnienc embed` applies it to volumes): "
        + ", ".join(f"{k}={v}" for k, v in pre.items()),
    ]


def _data(run_config: Mapping[str, Any] | None) -> list[str]:
    if run_config is None:
        return ["Not recorded (no resolved `config.yaml` beside the checkpoint)."]
    data = run_config.get("data") or {}
    lines = [f"From the run's resolved `{RUN_CONFIG}`:", ""]
    lines.append(f"- volume folders: {', '.join(f'`{r}`' for r in data.get('roots') or []) or '–'}")
    lines.append(f"- data root: `{run_config.get('data_root') or 'default ($OMNIENC_DATA)'}`")
    if data.get("medmnist"):
        lines.append(
            f"- MedMNIST splits (labels unused): {', '.join(data['medmnist'])}, share "
            f"{data.get('medmnist_fraction', 0)} of samples"
        )
    lines.append(f"- seed: {run_config.get('seed', 'not recorded')}")
    return lines


def render_model_card(
    config: Mapping[str, Any],
    *,
    license: str,
    run_config: Mapping[str, Any] | None = None,
    results: Sequence[BenchResult] = (),
    repo_id: str | None = None,
    title: str | None = None,
) -> str:
    """The ``README.md`` of an exported encoder.

    Args:
        config: The checkpoint's ``config.json``.
        license: SPDX-style license id for the front matter (``apache-2.0``, ``cc-by-4.0``, ...).
        run_config: The run's resolved ``config.yaml``, when known.
        results: Measured numbers (:func:`read_bench_results`).
        repo_id: The Hub id it will be published under (``ORG/NAME``), for the loading example.
        title: Heading (default: ``repo_id`` or "omnienc encoder ARCH").

    Returns:
        Markdown with YAML front matter.
    """
    front = {
        "library_name": "omnienc",
        "license": license,
        "tags": list(TAGS),
        "pipeline_tag": "feature-extraction",
    }
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    heading = title or repo_id or f"omnienc encoder {config['arch']}"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {heading}", ""]
    lines += [
        f"A frozen 3D {config['family']} encoder for radiology volumes (CT, MRI, PET), pretrained "
        "without labels with omnienc (mask-guided in-context segmentation as in MASS, "
        "https://arxiv.org/abs/2603.13660, and/or a contrastive objective on two views). "
        "Weights are safetensors; `config.json` holds the encoder config and preprocessing.",
        "",
        "## Recipe",
        "",
        *_recipe(config),
        "",
        "## Pretraining data",
        "",
        *_data(run_config),
        "",
        "## Measured results",
        "",
    ]
    if not results:
        lines.append("None recorded with this export.")
    for result in results:
        lines += [f"From `{result.path.name}`, made by:", "", "```", result.command, "```", ""]
        for name, table in result.sections:
            lines += [f"**{name}**", "", table, ""]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "import omnienc",
        f'encoder, preprocessing = omnienc.load_encoder("{where}")',
        "features = encoder(volumes)  # (B, 1, D, H, W) float32 -> (B, "
        f"{config['embed_dim']}) pooled embeddings",
        "```",
        "",
        "```bash",
        f"omnienc embed {where} scans/ -o features.npz",
        "```",
        "",
    ]
    return "\n".join(lines)
