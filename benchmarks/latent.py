"""Latent-space structure of a checkpoint beside its random-init floor, on all the real data here.

    python -m omnienc.benchmarks.latent --checkpoint checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/latent

Inputs (from the data root): every readable volume under ``volumes/`` (whole volumes, CT / MR /
PET / unknown as :func:`omnienc.io.read_volume` infers), one crop around every structure of at
least ``--min-voxels`` voxels in the four image/label-map pairs of
:data:`omnienc.adapters.latent.crops.SHARED_STRUCTURE_PAIRS`, ``--max-per-input`` items of
AdrenalMNIST3D 28 test and all of BreastMNIST 28 test. The checkpoint and a random-init encoder
of the same shape (seed ``--seed``) embed the same inputs; each gets a seeded UMAP and the
numbers of :func:`omnienc.adapters.latent.metrics.latent_metrics`. Writes ``OUT.md``,
``OUT.json`` and ``OUT/pretrained.png``, ``OUT/random-init.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from omnienc.adapters.latent import (
    SHARED_STRUCTURE_PAIRS,
    LatentMap,
    LatentOptions,
    build_latent_map,
    comparison_rows,
    map_encoders,
    write_latent_map,
)
from omnienc.benchmarks.report import machine_facts, write_report
from omnienc.data.root import resolve_data_root

MEDMNIST_INPUTS = ("medmnist:adrenalmnist3d:28:test", "medmnist:breastmnist:28:test")


def benchmark_inputs(data_root: Path) -> list[str]:
    """The input specs of the benchmark under ``data_root``."""
    vol = data_root / "volumes"
    structures = [
        f"structures:{vol / image}:{vol / labels}" + (f":{name}" if name else "")
        for image, labels, name in SHARED_STRUCTURE_PAIRS
    ]
    return [str(vol), *structures, *MEDMNIST_INPUTS]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _findings(maps: list[LatentMap]) -> list[str]:
    """One line per colouring: which encoder separates it more, by each measure."""
    if len(maps) != 2:
        return []
    a, b = maps
    lines = []
    for ca in a.metrics.colourings:
        cb = next((c for c in b.metrics.colourings if c.colouring == ca.colouring), None)
        if cb is None or ca.knn_accuracy is None or cb.knn_accuracy is None:
            continue
        assert ca.silhouette_features is not None and cb.silhouette_features is not None
        assert ca.knn_balanced_accuracy is not None and cb.knn_balanced_accuracy is not None
        lines.append(
            f"- **{ca.colouring}** ({ca.n} points, {len(ca.classes)} classes): silhouette "
            f"{ca.silhouette_features:+.3f} {a.tag} vs {cb.silhouette_features:+.3f} {b.tag}; "
            f"kNN balanced accuracy {ca.knn_balanced_accuracy:.3f} vs "
            f"{cb.knn_balanced_accuracy:.3f} (chance {1 / len(ca.classes):.3f})."
        )
    return lines


def to_markdown(doc: dict[str, Any], maps: list[LatentMap], image_dir: str) -> str:
    """The results page: command, machine, pictures, numbers."""
    m = doc["machine"]
    pre = maps[0]
    lines = [
        "# Latent space: pretrained encoder beside its random-init floor",
        "",
        f"Command: `{doc['command']}`  ",
        f"Checkpoint: `{doc['checkpoint']}` (`{pre.checkpoint}`); floor: `{maps[-1].name}`  ",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, GPU: {m['gpu'] or 'none'}; "
        f"{m['date']}; {doc['seconds'] / 60:.1f} min in all (features, UMAP and metrics of "
        "both encoders)",
        "",
        f"Inputs ({pre.metrics.n} points, the same for both encoders; at most "
        f"{doc['options']['max_per_input']} per input, seeded):",
        "",
    ]
    for spec, n in doc["points_per_input"].items():
        lines.append(f"- `{spec}`: {n}")
    lines += [
        "",
        "Each point is the pooled frozen feature of one whole volume, one structure crop "
        f"({'x'.join(map(str, doc['crop_size']))} voxels at the encoder's spacing, centred on "
        "the structure) or one MedMNIST item. UMAP: umap-learn, cosine distance on centred "
        f"features, n_neighbors {doc['options']['n_neighbors']}, min_dist "
        f"{doc['options']['min_dist']}, random_state {doc['options']['seed']}.",
        "",
    ]
    for mp in maps:
        lines += [f"## {mp.tag}: {mp.name}", "", f"![{mp.tag}]({image_dir}/{mp.tag}.png)", ""]
    header, rows = comparison_rows(maps)
    lines += [
        "## Numbers",
        "",
        "Silhouette: mean silhouette of the colouring's classes, cosine distance on centred "
        "features (*silhouette*) and Euclidean distance in the UMAP (*sil. 2D*); 1 is perfect "
        "separation, 0 none. kNN: a cosine 5-nearest-neighbour classifier of the colouring in "
        "feature space, stratified cross-validation with min(5, smallest class) folds; "
        "accuracy, balanced accuracy in brackets; *majority* is the share of the largest class. "
        "Points without a value (whole volumes have no label; `unknown` modality) and classes "
        "of a single point are left out of a colouring. *label within D* / *group within D*: "
        "the same on one dataset's points only (features centred on those points), the "
        "structure that is not just telling datasets apart. Trustworthiness (scikit-learn, "
        "cosine, 10 neighbours): whether the points that are close in the UMAP are close in "
        "feature space too (1: no false neighbours in the map).",
        "",
        *_markdown_table(header, rows),
        "",
        "### Per colouring",
        "",
        *_findings(maps),
        "",
        "Caveats: every dataset here has one modality, so *modality* and *dataset* are "
        "confounded; the within-dataset rows are the cleaner test. Crops of neighbouring "
        "structures overlap (ribs, vertebrae), which helps their kNN. AdrenalMNIST3D items are "
        "binary shape masks, not CT intensities.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/omnienc-cpu30min"))
    p.add_argument("--data", type=Path, help="data root (default: $OMNIENC_DATA, ../shared/data)")
    p.add_argument("--max-per-input", type=int, default=200)
    p.add_argument("--min-voxels", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latent"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    command = "python -m omnienc.benchmarks.latent " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    start = time.perf_counter()
    root = resolve_data_root(args.data)
    inputs = benchmark_inputs(root)
    options = LatentOptions(
        max_per_input=args.max_per_input, min_voxels=args.min_voxels, seed=args.seed
    )
    maps = []
    encoders = map_encoders(args.checkpoint, seed=args.seed)
    for enc in encoders:
        mp = build_latent_map(enc, inputs, root / "medmnist", options, progress=not args.quiet)
        write_latent_map(mp, args.out, formats=("png",))
        maps.append(mp)
        print(f"{enc.tag}: {len(mp.latent)} points, {mp.seconds}", flush=True)
    doc: dict[str, Any] = {
        "command": command,
        "checkpoint": str(args.checkpoint),
        "inputs": [s.replace(str(root), "<data root>") for s in inputs],
        "crop_size": list(encoders[0].crop_size),
        "options": {
            "max_per_input": args.max_per_input,
            "min_voxels": args.min_voxels,
            "n_neighbors": options.n_neighbors,
            "min_dist": options.min_dist,
            "seed": args.seed,
        },
        "points_per_input": {
            spec.replace(str(root), "<data root>"): n
            for spec, n in Counter(maps[0].latent.inputs).items()
        },
        "maps": [{k: v for k, v in mp.summary().items() if k != "points_per_input"} for mp in maps],
        "machine": machine_facts(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = to_markdown(doc, maps, args.out.name)
    write_report(args.out, doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
