"""Negative supports: does the head stop firing on look-alike tissue when told what it is not?

A diagnostic of the few-shot benchmark (:mod:`omnienc.benchmarks.fewshot`), run on its
cross-scan queries with the pretrained head. On CT and on BraTS T1c the head fires on tissue that
looks like the support's structure (``fewshot_localise``: the wrong place, not the wrong
threshold). Here the support also says what the structure is *not*: the head runs once more per
*negative* task drawn from the same support, on the same reference crop, and a voxel stays in
the mask only where the structure's probability beats every negative's (strictly: where both
saturate near 1, float rounding decides; another torch thread count moved one FLAIR query by
0.03). No labels beyond the support's mask are used, so these are few-shot methods:

* ``head``: ``p > 0.5``, the benchmark's method;
* ``head_vs_proposals``: negatives are the support's class-agnostic mask proposals (the
  pretext's own generator, :func:`~omnienc.pretext.masks.providers.propose_masks` with the
  default :class:`~omnienc.pretext.masks.MaskConfig`) that share at most :data:`MAX_SHARE` of
  their voxels with the structure and of the structure's voxels with them, and hold at least
  :data:`MIN_IN_CROP` voxels in the reference crop: the first :data:`NEGATIVES` in the
  generator's order, the kind of task the head was pretrained on;
* ``head_vs_ring``: one negative, the body within :data:`RING_MM` of the structure along each
  axis (a box dilation, so up to ``sqrt(3)`` times that at the corners) and outside it: the
  tissue a support's mask borders;
* ``head_vs_both``: every negative of the two.

The rule and its constants were fixed before the module was run on the suite's encoders; every
variant is reported, none is selected.

Usage::

    python -m omnienc.benchmarks.fewshot_negatives --encoder checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/pretext/shipped-negatives
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from omnienc.adapters.segmentation import WindowFeatures
from omnienc.benchmarks.fewshot import run_fewshot
from omnienc.benchmarks.fewshot_diagnostics import (
    diagnostic_main,
    paired_differences,
    paired_table,
    refuse_random_init,
    rows_by_cell,
    variant_table,
)
from omnienc.benchmarks.fewshot_methods import Reference
from omnienc.benchmarks.fewshot_pairs import Structure
from omnienc.benchmarks.fewshot_report import summarize
from omnienc.benchmarks.fewshot_rows import FewshotRun
from omnienc.benchmarks.fewshot_scans import PreparedScan, Target, support_mask, whole
from omnienc.pretext.masks import MaskConfig
from omnienc.pretext.masks.image import body_mask
from omnienc.pretext.masks.providers import propose_masks
from omnienc.transforms import centred_crop

NEGATIVES = 4
"""Most proposals used as negatives per support structure."""
MIN_IN_CROP = 200
"""Voxels a negative proposal needs inside the reference crop."""
MAX_SHARE = 0.2
"""Largest share of a proposal inside the structure, and of the structure inside the proposal."""
RING_MM = 10.0
"""Width of the ring negative around the structure, in mm."""

VARIANTS = ("head", "head_vs_proposals", "head_vs_ring", "head_vs_both")
"""Every variant reported, in table order."""


def negative_masks(
    mask: np.ndarray,
    proposals: np.ndarray,
    body: np.ndarray,
    crop_size: Sequence[int],
    spacing: Sequence[float],
) -> dict[str, list[np.ndarray]]:
    """The negatives of one support structure, on its reference crop.

    Args:
        mask: ``(X, Y, Z)`` bool structure mask on the support's encoder grid (not empty).
        proposals: ``(K, X, Y, Z)`` bool class-agnostic proposals of the same grid.
        body: ``(X, Y, Z)`` bool body mask.
        crop_size: The reference crop ``(S_x, S_y, S_z)`` (centred on ``mask`` as the head's).
        spacing: Voxel size in mm.

    Returns:
        ``{"proposals": [...], "ring": [...]}``: ``(S_x, S_y, S_z)`` float32 crops (at most
        :data:`NEGATIVES` proposals; no ring when it is empty in the crop).
    """
    n_mask = int(mask.sum())
    chosen: list[np.ndarray] = []
    for p in proposals:
        shared = int(np.logical_and(p, mask).sum())
        if shared > MAX_SHARE * int(p.sum()) or shared > MAX_SHARE * n_mask:
            continue
        crop = centred_crop(p.astype(np.float32), mask, crop_size)[0]
        if crop.sum() >= MIN_IN_CROP:
            chosen.append(crop)
            if len(chosen) == NEGATIVES:
                break
    radius = np.maximum(1, np.round(RING_MM / np.asarray(spacing, np.float64))).astype(int)
    ball = np.ones(tuple(2 * r + 1 for r in radius), bool)
    ring = ndimage.binary_dilation(mask, structure=ball) & ~mask & body
    ring_crop = centred_crop(ring.astype(np.float32), mask, crop_size)[0]
    return {"proposals": chosen, "ring": [ring_crop] if ring_crop.any() else []}


def beats_negatives(prob: np.ndarray, negatives: Sequence[np.ndarray]) -> np.ndarray:
    """``prob`` where it is above every negative's probability, else 0 (``(x, y, z)`` float32)."""
    best = np.zeros_like(prob)
    for n in negatives:
        np.maximum(best, n, out=best)
    return np.where(prob > best, prob, 0.0).astype(np.float32)


class NegativesRun(FewshotRun):
    """:class:`FewshotRun` that also scores the negative-support variants on cross-scan queries.

    The query's windows reach :meth:`_pretrained_head` through :meth:`_encode`, which the
    benchmark calls once per query scan before its rows.
    """

    cross_only = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "head" not in self.methods:
            why = self.roles.unavailable.get("head", "not asked for")
            raise ValueError(f"the negative-support diagnostic needs ['head']: {why}")
        self._negatives: dict[tuple[str, str], dict[str, list[Reference]]] = {}
        self._windows: WindowFeatures | None = None

    def _encode(self, image: np.ndarray) -> dict[str, WindowFeatures]:
        windows = super()._encode(image)
        self._windows = windows["pretrained"]
        return windows

    def _support_pass(self, scan: PreparedScan, structures: list[Structure]) -> None:
        super()._support_pass(scan, structures)
        image = scan.pre_image
        proposals, body = propose_masks(image, MaskConfig()), body_mask(image)
        em = self.roles.encoders["pretrained"]
        spacing = self.roles.preprocessing.spacing or scan.image.spacing
        for st in structures:
            ref = self._refs[("pretrained", scan.scan.key, st.name)]
            masks = negative_masks(
                support_mask(whole(scan), st), proposals, body, em.crop_size, spacing
            )
            self._negatives[(scan.scan.key, st.name)] = {
                kind: [Reference(ref.feats, torch.from_numpy(m)[None, None], []) for m in crops]
                for kind, crops in masks.items()
            }

    def _pretrained_head(self, target: Target, prob: np.ndarray, pred: np.ndarray) -> None:
        row = target.row
        assert self._windows is not None
        em = self.roles.encoders["pretrained"]
        maps: dict[str, list[np.ndarray]] = {"proposals": [], "ring": []}
        for s in row.supports:
            for kind, refs in self._negatives[(s, row.structure.name)].items():
                maps[kind] += [em.head_probabilities(self._windows, [r]) for r in refs]
        threshold = self.settings.threshold
        for name, negs in (
            ("head_vs_proposals", maps["proposals"]),
            ("head_vs_ring", maps["ring"]),
            ("head_vs_both", maps["proposals"] + maps["ring"]),
        ):
            kept = beats_negatives(prob, negs)
            self._score(target, name, self._to_native(kept, target.view, threshold))


def run_negatives(
    encoder_spec: str, data_root: Any = None, *, quick: bool = False, progress: bool = True, **kw
) -> dict[str, Any]:
    """The few-shot benchmark's cross-scan queries with every variant scored.

    Args:
        encoder_spec: An exported checkpoint folder with an in-context head.
        data_root: The shared data folder (``None``: the default).
        quick: The benchmark's fixed subset.
        progress: One line per query.
        **kw: Passed to :func:`~omnienc.benchmarks.fewshot.run_fewshot` (``catalogue``,
            ``min_voxels``, ``crop_size``).

    Returns:
        The few-shot payload, its ``rows`` restricted to cross-scan queries, ``summary`` over
        :data:`VARIANTS`, and ``"paired"`` (per cell, each variant minus ``head``).

    Raises:
        ValueError: The encoder has no in-context head (refused before any query runs).
        CheckpointError: The checkpoint is missing or unreadable.
    """
    refuse_random_init(encoder_spec)
    payload = run_fewshot(
        encoder_spec,
        data_root,
        quick=quick,
        methods=["head"],
        progress=progress,
        runner=NegativesRun,
        **kw,
    )
    payload["benchmark"] = "fewshot_negatives"
    rows = payload["rows"]  # cross-scan only (``cross_only``)
    payload["variants"] = list(VARIANTS)
    payload["constants"] = {
        "negatives": NEGATIVES,
        "min_in_crop": MIN_IN_CROP,
        "max_share": MAX_SHARE,
        "ring_mm": RING_MM,
    }
    payload["summary"] = summarize(rows, VARIANTS)
    pairs = [(v, "head") for v in VARIANTS[1:]]
    payload["paired"] = paired_differences(rows_by_cell(rows), pairs)
    return payload


def negatives_markdown(payload: dict[str, Any]) -> str:
    """The diagnostic's tables: Dice per variant, and each variant minus the head."""
    variants, cells = payload["variants"], payload["summary"]["cells"]
    lines = [
        "# Negative supports for the in-context head (few-shot diagnostic)",
        "",
        f"Command: `{payload.get('command', '')}`  ",
        f"Encoder: `{payload['encoder'].get('checkpoint')}`; windows "
        f"{payload['settings']['crop_size']}; {len(payload['rows'])} cross-scan queries; "
        f"{payload['seconds']:.0f} s; constants {payload['constants']}.",
        "",
        "Mean Dice per cell, bootstrap 95% interval over queries (variants: the module's "
        "docstring, `omnienc.benchmarks.fewshot_negatives`):",
        "",
    ]
    lines += variant_table(cells, variants)
    lines += paired_table(payload["paired"])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnienc.benchmarks.fewshot_negatives``: run, write JSON + Markdown, print."""
    doc = (__doc__ or "").split("\n")[0]
    return diagnostic_main(
        "omnienc.benchmarks.fewshot_negatives", doc, run_negatives, negatives_markdown, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
