"""A latent-map run per encoder: features -> UMAP -> numbers -> PNG, HTML and CSV files.

``omnienc umap`` and ``python -m omnienc.benchmarks.latent`` both run :func:`build_latent_map`
for a checkpoint and for a random-init encoder of the same shape (:func:`map_encoders`), then
:func:`write_latent_map` and :func:`write_summary`; :func:`comparison_rows` puts their numbers
side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.adapters.classification import checkpoint_id, random_checkpoint_id
from omnienc.adapters.latent.crops import DEFAULT_CROP
from omnienc.adapters.latent.gather import gather_latent
from omnienc.adapters.latent.html import write_html
from omnienc.adapters.latent.metrics import (
    ColouringMetrics,
    LatentMetrics,
    latent_metrics,
    umap_layout,
)
from omnienc.adapters.latent.points import (
    COLOURINGS,
    MISSING,
    UNKNOWN_MODALITY,
    LatentOptions,
    LatentSet,
    palette,
)
from omnienc.atomic import write_bytes_atomic
from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.encoders import arch_name, random_encoder, random_like
from omnienc.encoders.base import Encoder
from omnienc.preprocessing import Preprocessing


def _panel_title(name: str, metrics: LatentMetrics | None) -> str:
    if metrics is None:
        return name
    m = next((c for c in metrics.colourings if c.colouring == name), None)
    if m is None or m.knn_accuracy is None:
        return f"{name} (not measurable)"
    return (
        f"{name}: silhouette {m.silhouette_features:+.2f} (2D {m.silhouette_2d:+.2f}), "
        f"kNN acc {m.knn_accuracy:.2f} (majority {m.majority:.2f})"
    )


def render_png(
    latent: LatentSet,
    coords: np.ndarray,
    title: str,
    metrics: LatentMetrics | None = None,
    max_legend: int = 18,
) -> bytes:
    """The map as a PNG: one panel per colouring (modality, dataset, label, group).

    Args:
        latent: The points.
        coords: ``(N, 2)`` map coordinates.
        title: Figure title (the encoder).
        metrics: Shown in the panel titles when given.
        max_legend: Legend entries per panel; the rest are counted in one line.

    Returns:
        PNG bytes. Drawn with matplotlib's object API, so no pyplot backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 11), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    xy = np.asarray(coords)
    for ax, name in zip(axes.ravel(), COLOURINGS, strict=True):
        values = latent.column(name)
        colours = palette(values)
        counts = Counter(values)
        order = sorted(counts, key=lambda v: (v in (MISSING, UNKNOWN_MODALITY), -counts[v], v))
        for rank, v in enumerate(order[::-1]):  # the largest classes drawn first, below
            rows = [i for i, u in enumerate(values) if u == v]
            ax.scatter(
                xy[rows, 0],
                xy[rows, 1],
                s=14,
                c=colours[v],
                alpha=0.85,
                linewidths=0,
                label=f"{v} ({counts[v]})" if len(order) - 1 - rank < max_legend else None,
                zorder=2 + rank,
            )
        handles, labels = ax.get_legend_handles_labels()
        pairs = sorted(
            zip(labels, handles, strict=True), key=lambda p: order.index(p[0].rsplit(" (", 1)[0])
        )
        if len(order) > max_legend:
            extra = len(order) - max_legend
            pairs.append((f"+ {extra} more", ax.scatter([], [], s=0)))
        ax.legend(
            [h for _, h in pairs],
            [lab for lab, _ in pairs],
            fontsize=7,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            markerscale=1.2,
        )
        ax.set_title(_panel_title(name, metrics), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    subtitle = f"{len(latent)} points" + (
        f"; trustworthiness {metrics.trustworthiness:.3f} (k={metrics.trustworthiness_k})"
        if metrics is not None
        else ""
    )
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_csv(path: str | Path, latent: LatentSet, coords: np.ndarray) -> Path:
    """The 2D coordinates with every point's id and colourings, written atomically.

    Columns: ``id, x, y, modality, dataset, label, group, input, source``.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "x", "y", *COLOURINGS, "input", "source"])
    for i in range(len(latent)):
        w.writerow(
            [
                latent.ids[i],
                f"{float(coords[i, 0]):.6g}",
                f"{float(coords[i, 1]):.6g}",
                *(getattr(latent, c)[i] for c in COLOURINGS),
                latent.inputs[i],
                latent.sources[i],
            ]
        )
    return write_bytes_atomic(path, buf.getvalue().encode())


@dataclass
class MapEncoder:
    """An encoder to map, and what to call it.

    Attributes:
        tag: Short name used for files, e.g. ``pretrained`` or ``random-init``.
        name: What it is, for titles (a checkpoint path, ``random-init resconv_small``).
        encoder: The encoder.
        preprocessing: Its preprocessing.
        checkpoint: ``sha256:HEX`` of a checkpoint or ``random:ARCH:SEED``.
        crop_size: Structure crop size (its pretraining crop).
    """

    tag: str
    name: str
    encoder: Encoder
    preprocessing: Preprocessing
    checkpoint: str
    crop_size: tuple[int, int, int] = DEFAULT_CROP


def map_encoders(
    checkpoint: str | Path | None = None,
    random_arch: str | None = None,
    seed: int = 0,
    floor: bool = True,
) -> list[MapEncoder]:
    """The encoders of a latent-map run: a checkpoint and its random-init floor, or one random.

    Args:
        checkpoint: An exported encoder folder.
        random_arch: Instead, a registered architecture to map at random init.
        seed: Seed of the random-init encoder.
        floor: With a checkpoint, also map a random-init encoder of the same shape and
            preprocessing (drawn with ``seed``).

    Returns:
        One or two :class:`MapEncoder`.

    Raises:
        ValueError: Neither or both of ``checkpoint`` and ``random_arch``.
        CheckpointError: The checkpoint cannot be loaded.
    """
    if (checkpoint is None) == (random_arch is None):
        raise ValueError("give a checkpoint or a random-init architecture, not both or neither")
    if random_arch is not None:
        enc = random_encoder(random_arch, seed)
        return [
            MapEncoder(
                "random-init",
                f"random-init {random_arch} (seed {seed})",
                enc,
                Preprocessing(),
                random_checkpoint_id(random_arch, seed),
            )
        ]
    assert checkpoint is not None
    encoder, pre = load_encoder(checkpoint)
    meta = load_checkpoint_config(checkpoint).get("meta") or {}
    crop = meta.get("crop_size") or DEFAULT_CROP
    crop_size = (int(crop[0]), int(crop[1]), int(crop[2]))
    out = [
        MapEncoder(
            "pretrained", str(checkpoint), encoder, pre, checkpoint_id(checkpoint), crop_size
        )
    ]
    if floor:
        arch = arch_name(encoder)
        out.append(
            MapEncoder(
                "random-init",
                f"random-init {arch}, same shape (seed {seed})",
                random_like(encoder, seed),
                pre,
                random_checkpoint_id(arch, seed),
                crop_size,
            )
        )
    return out


@dataclass
class LatentMap:
    """One encoder's map of the inputs.

    Attributes:
        tag: The encoder's tag.
        name: The encoder's name.
        checkpoint: Its weights id.
        latent: The points.
        coords: ``(N, 2)`` UMAP coordinates.
        metrics: The numbers beside the map.
        seconds: Wall time of ``features``, ``umap`` and ``metrics``.
    """

    tag: str
    name: str
    checkpoint: str
    latent: LatentSet
    coords: np.ndarray
    metrics: LatentMetrics
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable: everything but the features."""
        return {
            "tag": self.tag,
            "encoder": self.name,
            "checkpoint": self.checkpoint,
            "n": len(self.latent),
            "points_per_input": dict(Counter(self.latent.inputs)),
            "metrics": self.metrics.to_dict(),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }


def build_latent_map(
    enc: MapEncoder,
    inputs: Sequence[str],
    medmnist_root: Path | None = None,
    options: LatentOptions | None = None,
    progress: bool = True,
) -> LatentMap:
    """Features of ``inputs`` -> seeded UMAP -> :func:`latent_metrics`, for one encoder."""
    opts = options or LatentOptions()
    t0 = time.perf_counter()
    latent = gather_latent(
        enc.encoder,
        enc.preprocessing,
        inputs,
        checkpoint=enc.checkpoint,
        medmnist_root=medmnist_root,
        crop_size=enc.crop_size,
        options=opts,
        progress=progress,
    )
    t1 = time.perf_counter()
    coords = umap_layout(latent.features, opts.seed, opts.n_neighbors, opts.min_dist)
    t2 = time.perf_counter()
    metrics = latent_metrics(latent, coords, opts.seed)
    t3 = time.perf_counter()
    return LatentMap(
        enc.tag,
        enc.name,
        enc.checkpoint,
        latent,
        coords,
        metrics,
        {"features": t1 - t0, "umap": t2 - t1, "metrics": t3 - t2},
    )


FORMATS = ("png", "html", "csv")


def write_latent_map(
    m: LatentMap, out_dir: str | Path, formats: Sequence[str] = FORMATS
) -> dict[str, Path]:
    """Write ``OUT/TAG.png``, ``.html`` and ``.csv`` (those in ``formats``), atomically.

    Returns:
        ``{format: path}``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; known: {FORMATS}")
    out = Path(out_dir)
    title = f"{m.name}: UMAP of {len(m.latent)} frozen-feature vectors"
    paths: dict[str, Path] = {}
    if "png" in formats:
        paths["png"] = write_bytes_atomic(
            out / f"{m.tag}.png", render_png(m.latent, m.coords, title, m.metrics)
        )
    if "html" in formats:
        paths["html"] = write_html(out / f"{m.tag}.html", m.latent, m.coords, title, m.metrics)
    if "csv" in formats:
        paths["csv"] = write_csv(out / f"{m.tag}.csv", m.latent, m.coords)
    return paths


def _cell(m: ColouringMetrics | None, key: str) -> str:
    value = None if m is None else getattr(m, key)
    if value is None:
        return "–"
    return f"{value:+.3f}" if key.startswith("silhouette") else f"{value:.3f}"


def comparison_rows(maps: Sequence[LatentMap]) -> tuple[list[str], list[list[str]]]:
    """Side-by-side numbers of several maps of the same inputs, as a header and rows.

    One row per colouring: points and classes measured, then for each map the silhouette in
    feature space, in 2D, and the kNN accuracy (balanced accuracy in brackets), and the
    majority-class share; a last row gives each map's trustworthiness.
    """
    if not maps:
        return [], []
    header = ["colouring", "points", "classes"]
    for m in maps:
        header += [f"{m.tag} silhouette", f"{m.tag} sil. 2D", f"{m.tag} kNN acc (bal.)"]
    header.append("majority")
    names = [c.colouring for c in maps[0].metrics.colourings]
    for m in maps[1:]:
        names += [c.colouring for c in m.metrics.colourings if c.colouring not in names]
    rows = []
    for name in names:
        per = [next((c for c in m.metrics.colourings if c.colouring == name), None) for m in maps]
        first = next(c for c in per if c is not None)
        row = [name, str(first.n), str(len(first.classes))]
        for c in per:
            acc = _cell(c, "knn_accuracy")
            bal = _cell(c, "knn_balanced_accuracy")
            row += [_cell(c, "silhouette_features"), _cell(c, "silhouette_2d"), f"{acc} ({bal})"]
        row.append(_cell(first, "majority"))
        rows.append(row)
    trust = ["trustworthiness", str(maps[0].metrics.n), "–"]
    for m in maps:
        trust += ["", "", f"{m.metrics.trustworthiness:.3f} (k={m.metrics.trustworthiness_k})"]
    rows.append([*trust, ""])
    return header, rows


def write_summary(
    maps: Sequence[LatentMap],
    out_dir: str | Path,
    command: str,
    inputs: Sequence[str],
    options: LatentOptions,
) -> Path:
    """Write ``OUT/metrics.json``: the command, inputs, options and every map's numbers."""
    opts = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()
    }
    doc = {
        "command": command,
        "inputs": list(inputs),
        "options": opts,
        "maps": [m.summary() for m in maps],
    }
    text = json.dumps(doc, indent=2, allow_nan=False)
    return write_bytes_atomic(Path(out_dir) / "metrics.json", text.encode())
