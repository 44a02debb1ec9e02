"""Dense label transfer: do the frozen features put the same anatomy together across scans?

A diagnostic of the few-shot benchmark (:mod:`omnienc.benchmarks.fewshot`), run on its
cross-scan queries. The head and the prototype matcher both fail on CT (mean Dice 0.04-0.07
against registration's 0.34), and both compress the support into a few numbers (task tokens, one
prototype per scale). Non-parametric label transfer keeps all of it: every voxel of the support
scan is a labelled token, and every query voxel takes the labels of its nearest support tokens
in feature space, as label propagation with self-supervised features does (DINO, Caron et al.,
ICCV 2021; SAM, Yan et al., IEEE TMI 2022, for CT landmarks). If this also fails, the frozen
features do not correspond across scans, whatever reads them.

* Tokens: on the grid of the encoder scale :data:`TOKEN_SCALE` (stride 4 for ``resconv``), every
  scale's features are L2-normalised, area-pooled (finer scales) or trilinearly upsampled
  (coarser ones) to that grid, normalised again (every scale weighs the same), concatenated and
  L2-normalised
  (:func:`token_descriptors`).
* The support bank: the tokens of every sliding window over the whole support scan (the
  benchmark's windows, 192 mm), each with its structures' masks area-pooled to the token grid
  (:func:`support_bank`).
* The transfer: each query token's :data:`K` nearest bank tokens by cosine similarity, weighted
  by a softmax at temperature :data:`TEMPERATURE`, average their labels; the maps are upsampled
  to the window and blended over the query (:func:`transfer_labels`); ``> 0.5`` on the native
  grid, as the head. k supports average their maps.

``knn`` runs on the checkpoint's encoder, ``knn_random`` on the benchmark's random-init floor of
the same shape. The constants were fixed before the first run; nothing is tuned on the queries.

Usage::

    python -m omnienc.benchmarks.fewshot_knn --encoder checkpoints/omnienc-cpu30min \\
        --out benchmarks/results/pretext/shipped-knn
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnienc.adapters.segmentation import WindowFeatures
from omnienc.benchmarks.fewshot import run_fewshot
from omnienc.benchmarks.fewshot_diagnostics import (
    diagnostic_main,
    paired_differences,
    paired_table,
    rows_by_cell,
    variant_table,
)
from omnienc.benchmarks.fewshot_pairs import Structure
from omnienc.benchmarks.fewshot_report import summarize
from omnienc.benchmarks.fewshot_rows import FewshotRun
from omnienc.benchmarks.fewshot_scans import PreparedScan, Row, support_mask, whole

TOKEN_SCALE = 1
"""The encoder scale whose grid the tokens lie on (``resconv``: stride 4, 8 mm at 2 mm)."""
K = 10
"""Support tokens each query token takes its labels from."""
TEMPERATURE = 0.07
"""Softmax temperature over the K cosine similarities (DINO's label propagation uses 0.07)."""
CHUNK = 512
"""Query tokens per similarity matrix: its memory is CHUNK x bank tokens x 4 bytes (a whole CT's
bank, window overlaps included, holds up to about 250,000 tokens: 0.5 GB)."""
BASELINES = ("prototype", "prototype_random", "intensity", "registration")
"""The benchmark's methods run beside the transfer, on the same queries."""
VARIANTS = ("knn", "knn_random", *BASELINES)
"""Every method reported, in table order."""


def token_descriptors(feats: Sequence[torch.Tensor], scale: int = TOKEN_SCALE) -> torch.Tensor:
    """Unit descriptors of every scale's features on one scale's grid.

    Args:
        feats: ``forward_intermediates``: ``(n, C_i, d_i, h_i, w_i)`` per scale.
        scale: The index of the scale whose grid is kept.

    Returns:
        ``(n, sum C_i, d, h, w)`` float32, unit L2 norm along the channels.
    """
    if not 0 <= scale < len(feats):
        raise ValueError(f"scale {scale} is not one of the {len(feats)} feature scales")
    d, h, w = (int(s) for s in feats[scale].shape[2:])
    grid = (d, h, w)
    parts = []
    for f in feats:
        unit = F.normalize(f.float(), dim=1)
        size = tuple(int(s) for s in unit.shape[2:])
        if size != grid:
            coarser = all(a <= b for a, b in zip(size, grid, strict=True))
            if coarser:
                unit = F.interpolate(unit, size=grid, mode="trilinear", align_corners=False)
            else:
                unit = F.adaptive_avg_pool3d(unit, grid)
            unit = F.normalize(unit, dim=1)  # resizing shortens them: every scale weighs 1
        parts.append(unit)
    return F.normalize(torch.cat(parts, dim=1), dim=1)


@dataclass
class Bank:
    """A support scan's labelled tokens.

    Attributes:
        tokens: ``(N, C)`` unit descriptors.
        labels: ``(N, S)`` each token's share of every structure (area-pooled masks).
        names: The ``S`` structure names, in column order.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    names: list[str]


def support_bank(windows: WindowFeatures, masks: Sequence[np.ndarray], names: list[str]) -> Bank:
    """The tokens of every window of a support scan, labelled by its structures' masks.

    Args:
        windows: The support scan's sliding windows.
        masks: One ``(X, Y, Z)`` bool mask per structure, on the scan's encoder grid.
        names: The structures' names.

    Returns:
        The bank (window overlaps give near-duplicate tokens; padding is labelled background).
    """
    if not masks or len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks for {len(names)} structure names")
    onehot = torch.from_numpy(np.stack(masks).astype(np.float32))[None]
    onehot = F.pad(onehot, windows.padding())
    tokens, labels = [], []
    for box, feats in windows.per_window():
        desc = token_descriptors(feats)[0]
        d, h, w = (int(s) for s in desc.shape[1:])
        lab = F.adaptive_avg_pool3d(onehot[(..., *box)], (d, h, w))[0]
        tokens.append(desc.flatten(1).T)
        labels.append(lab.flatten(1).T)
    return Bank(torch.cat(tokens), torch.cat(labels), list(names))


def transfer_labels(
    windows: WindowFeatures, bank: Bank, k: int = K, temperature: float = TEMPERATURE
) -> np.ndarray:
    """Every query voxel's share of each structure, from its nearest support tokens.

    Args:
        windows: The query's sliding windows.
        bank: A support scan's bank.
        k: Nearest tokens per query token (capped at the bank's size).
        temperature: Softmax temperature over their cosine similarities.

    Returns:
        ``(S, X, Y, Z)`` float32 in [0, 1] on the query's encoder grid.
    """
    k = min(k, int(bank.tokens.shape[0]))

    def fn(feats: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
        desc = token_descriptors(feats)
        n, c, *grid = desc.shape
        queries = desc.flatten(2).transpose(1, 2).reshape(-1, c)
        out = []
        for chunk in queries.split(CHUNK):
            sim, idx = (chunk @ bank.tokens.T).topk(k, dim=1)
            weight = torch.softmax(sim / temperature, dim=1)
            out.append(torch.einsum("qk,qks->qs", weight, bank.labels[idx]))
        maps = torch.cat(out).reshape(n, *grid, -1).permute(0, 4, 1, 2, 3)
        return F.interpolate(maps, size=size, mode="trilinear", align_corners=False)

    return windows.blend(fn).clip(0.0, 1.0)


class KnnRun(FewshotRun):
    """:class:`FewshotRun` that also scores the label transfer on cross-scan queries.

    The windows of each scan reach the support and query passes through :meth:`_encode`, which
    the benchmark calls once per scan before its rows.
    """

    cross_only = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._banks: dict[tuple[str, str], Bank] = {}
        self._windows: dict[str, WindowFeatures] = {}

    def _encode(self, image: np.ndarray) -> dict[str, WindowFeatures]:
        self._windows = super()._encode(image)
        return self._windows

    def _windows_of(self, scan: PreparedScan) -> dict[str, WindowFeatures]:
        """The windows the pass just encoded, checked to be the whole scan's."""
        shape = tuple(scan.pre_image.shape)
        for role, windows in self._windows.items():
            if windows.shape != shape:  # another view was encoded last (intra-scan rows)
                raise RuntimeError(f"{role} windows cover {windows.shape}, not {shape}")
        return self._windows

    def seconds_per_query(self) -> dict[str, float]:
        """:meth:`FewshotRun.seconds_per_query` and the transfer's (banks and matching; the
        encoding is booked to the prototype matcher, which shares it)."""
        out = super().seconds_per_query()
        for role in self._roles:
            method = _name(role)
            n = sum(method in r.scores for r in self._cross)
            out[method] = round(self._seconds[method] / n, 3) if n else 0.0
        return out

    def _support_pass(self, scan: PreparedScan, structures: list[Structure]) -> None:
        super()._support_pass(scan, structures)
        masks = [support_mask(whole(scan), st) for st in structures]
        for role, windows in self._windows_of(scan).items():
            with self._clock(_name(role)):
                bank = support_bank(windows, masks, [st.name for st in structures])
            self._banks[(role, scan.scan.key)] = bank

    def _query_pass(self, scan: PreparedScan, rows: list[Row]) -> None:
        super()._query_pass(scan, rows)
        view = whole(scan)
        for role, windows in self._windows_of(scan).items():
            method = _name(role)
            with self._clock(method):
                maps = {
                    s: transfer_labels(windows, self._banks[(role, s)])
                    for s in dict.fromkeys(s for r in rows for s in r.supports)
                }
                for row in rows:
                    probs = [
                        maps[s][self._banks[(role, s)].names.index(row.structure.name)]
                        for s in row.supports
                    ]
                    pred = self._to_native(np.mean(probs, axis=0), view, self.settings.threshold)
                    target = self._target(row, view, row.structure)
                    self._score(target, method, pred)


def _name(role: str) -> str:
    return "knn" if role == "pretrained" else "knn_random"


def run_knn(
    encoder_spec: str, data_root: Any = None, *, quick: bool = False, progress: bool = True, **kw
) -> dict[str, Any]:
    """The few-shot benchmark's cross-scan queries with the label transfer scored.

    Args:
        encoder_spec: An exported checkpoint folder (its random-init floor runs too).
        data_root: The shared data folder (``None``: the default).
        quick: The benchmark's fixed subset.
        progress: One line per query.
        **kw: Passed to :func:`~omnienc.benchmarks.fewshot.run_fewshot` (``catalogue``,
            ``min_voxels``, ``crop_size``, ``methods``: default :data:`BASELINES`).

    Returns:
        The few-shot payload, its ``rows`` restricted to cross-scan queries, ``summary`` over
        the methods that ran, and ``"paired"`` (per cell, ``knn`` minus each other method).

    Raises:
        ValueError: A ``random:`` spec (it has no floor to compare with).
        CheckpointError: The checkpoint is missing or unreadable.
    """
    if encoder_spec.startswith("random:"):
        raise ValueError(f"{encoder_spec}: give a checkpoint; its random-init floor runs too")
    methods = list(kw.pop("methods", BASELINES))
    # The transfer reads the windows of both encoders, which these two methods encode.
    methods += [m for m in ("prototype", "prototype_random") if m not in methods]
    payload = run_fewshot(
        encoder_spec,
        data_root,
        quick=quick,
        methods=methods,
        progress=progress,
        runner=KnnRun,
        **kw,
    )
    payload["benchmark"] = "fewshot_knn"
    ran = [v for v in VARIANTS if v in ("knn", "knn_random") or v in methods]
    payload["variants"] = ran
    payload["constants"] = {"token_scale": TOKEN_SCALE, "k": K, "temperature": TEMPERATURE}
    payload["summary"] = summarize(payload["rows"], ran)
    pairs = [("knn", v) for v in ran if v != "knn"]
    payload["paired"] = paired_differences(rows_by_cell(payload["rows"]), pairs)
    return payload


def knn_markdown(payload: dict[str, Any]) -> str:
    """The diagnostic's tables: Dice per method, and the transfer minus each other method."""
    variants, cells = payload["variants"], payload["summary"]["cells"]
    lines = [
        "# Dense label transfer with frozen features (few-shot diagnostic)",
        "",
        f"Command: `{payload.get('command', '')}`  ",
        f"Encoder: `{payload['encoder'].get('checkpoint')}`; floor `{payload.get('floor')}`; "
        f"windows {payload['settings']['crop_size']}; {len(payload['rows'])} cross-scan "
        f"queries; {payload['seconds']:.0f} s; constants {payload['constants']}.",
        "",
        "Mean Dice per cell, bootstrap 95% interval over queries (methods: the module's "
        "docstring, `omnienc.benchmarks.fewshot_knn`, and the few-shot benchmark's):",
        "",
    ]
    lines += variant_table(cells, variants)
    lines += paired_table(payload["paired"])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnienc.benchmarks.fewshot_knn``: run, write JSON + Markdown, print."""
    doc = (__doc__ or "").split("\n")[0]
    return diagnostic_main("omnienc.benchmarks.fewshot_knn", doc, run_knn, knn_markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
