"""Latent-space maps: frozen features of mixed inputs -> UMAP -> measured structure -> files.

* :mod:`~omnienc.adapters.latent.points`: the inputs, the colourings and :class:`LatentSet`;
* :mod:`~omnienc.adapters.latent.gather`: :func:`gather_latent`, the points' features;
* :mod:`~omnienc.adapters.latent.crops`: fixed-size crops around the structures of a label map;
* :mod:`~omnienc.adapters.latent.metrics`: the seeded UMAP layout and the numbers beside it;
* :mod:`~omnienc.adapters.latent.maps`: a whole map per encoder, with PNG, CSV and summary;
* :mod:`~omnienc.adapters.latent.html`: the self-contained interactive HTML page.
"""

from omnienc.adapters.latent.crops import (
    DEFAULT_CROP,
    SHARED_STRUCTURE_PAIRS,
    CropDataset,
    StructureCrop,
    structure_crops,
    structure_group,
)
from omnienc.adapters.latent.gather import gather_latent
from omnienc.adapters.latent.html import render_html, write_html
from omnienc.adapters.latent.maps import (
    FORMATS,
    LatentMap,
    MapEncoder,
    build_latent_map,
    comparison_rows,
    map_encoders,
    render_png,
    write_csv,
    write_latent_map,
    write_summary,
)
from omnienc.adapters.latent.metrics import (
    ColouringMetrics,
    LatentMetrics,
    centred,
    colouring_metrics,
    latent_metrics,
    trustworthiness_k,
    umap_layout,
)
from omnienc.adapters.latent.points import (
    COLOURINGS,
    MISSING,
    LatentOptions,
    LatentSet,
    check_inputs,
    medmnist_file,
    palette,
    parse_structures_spec,
)

__all__ = [
    "COLOURINGS",
    "DEFAULT_CROP",
    "FORMATS",
    "MISSING",
    "SHARED_STRUCTURE_PAIRS",
    "ColouringMetrics",
    "CropDataset",
    "LatentMap",
    "LatentMetrics",
    "LatentOptions",
    "LatentSet",
    "MapEncoder",
    "StructureCrop",
    "build_latent_map",
    "centred",
    "check_inputs",
    "colouring_metrics",
    "comparison_rows",
    "gather_latent",
    "latent_metrics",
    "map_encoders",
    "medmnist_file",
    "palette",
    "parse_structures_spec",
    "render_html",
    "render_png",
    "structure_crops",
    "structure_group",
    "trustworthiness_k",
    "umap_layout",
    "write_csv",
    "write_html",
    "write_latent_map",
    "write_summary",
]
