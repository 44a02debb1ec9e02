"""The queries of a few-shot run, computed in two passes over the scans, and their timing.

*Pass 1* visits every support scan once: its windows are encoded once per encoder; for each of
its structures the reference (crop features, prototypes) is made, the prototype threshold is
chosen on the scan's own similarity map, and the two diagnostics run: *identity* (the scan is
its own query) and *intra-scan* (:func:`~omnienc.benchmarks.fewshot_scans.halves`: the support
is the lower half, the query the upper half's sub-volume, scored on the native voxels of that
half). *Pass 2* visits every query scan once: its windows are encoded once per encoder, and
every cross-scan query on it reuses the supports' references; each (support, query)
registration is computed once and serves every structure.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from omnienc.adapters.segmentation import WindowFeatures, best_threshold
from omnienc.benchmarks.fewshot_methods import (
    Reference,
    intensity_mask,
    native_mask,
    score,
    within_mm,
)
from omnienc.benchmarks.fewshot_pairs import Structure, in_quick_subset
from omnienc.benchmarks.fewshot_scans import (
    Cut,
    PreparedScan,
    Row,
    Target,
    View,
    halves,
    support_mask,
    whole,
)
from omnienc.benchmarks.fewshot_setup import ATLAS_OF, ROLE_OF, Roles, Settings
from omnienc.benchmarks.registration import (
    majority_vote,
    register_atlas,
    warp_labels,
    working_image,
)

QUICK_DIAGNOSTICS = ("liver", "whole_tumour", "lesion")
"""The structures whose identity and intra-scan rows ``--quick`` runs."""


class FewshotRun:
    """Plan and run the queries of one benchmark run.

    Args:
        prepared: Every scan the plan uses, by key.
        roles: The encoders (:func:`~omnienc.benchmarks.fewshot_setup.build_roles`).
        methods: The methods to run.
        settings: The run's settings.
        log: Called with one line per finished query (``None``: silent).

    Attributes:
        cross_only: Skip the identity and intra-scan rows (a diagnostic of the cross-scan
            queries sets it).
    """

    cross_only = False

    def __init__(
        self,
        prepared: dict[str, PreparedScan],
        roles: Roles,
        methods: Sequence[str],
        settings: Settings,
        log: Callable[[str], Any] | None = None,
    ) -> None:
        self.prepared, self.roles, self.methods, self.settings = prepared, roles, methods, settings
        self.log = log
        self._roles = sorted({ROLE_OF[m] for m in methods if m in ROLE_OF})
        self._cross: list[Row] = []
        self._diagnostic: list[Row] = []
        self._supports: dict[str, list[Structure]] = {}
        self._refs: dict[tuple[str, str, str], Reference] = {}
        self._working: dict[str, sitk.Image] = {}
        self._seconds: dict[str, float] = defaultdict(float)
        self.stage_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------- planning

    def plan(self, sets: Sequence[tuple[tuple[str, ...], str]], quick: bool = False) -> None:
        """Make the cross-scan rows of ``sets`` (and note every support's structures).

        A structure is scored when every scan of the set has ``min_voxels`` of it natively;
        ``quick`` keeps only :func:`~omnienc.benchmarks.fewshot_pairs.in_quick_subset` rows.
        """
        need = self.settings.min_voxels
        for supports, q in sets:
            query = self.prepared[q]
            for st in query.scan.structures:
                counts = [self.prepared[s].voxels(st) for s in supports]
                if min(counts, default=0) < need or query.voxels(st) < need:
                    continue
                if quick and not in_quick_subset(query.scan.group, supports, q, st.name):
                    continue
                group = query.scan.group
                self._cross.append(Row(group, group, st, supports, q, counts, query.voxels(st)))
                for s in supports:
                    if st not in self._supports.setdefault(s, []):
                        self._supports[s].append(st)

    def rows(self) -> list[dict[str, Any]]:
        """Every row as JSON: cross-scan, then identity, then intra-scan."""
        diag = sorted(self._diagnostic, key=lambda r: r.group != "identity")
        return [r.to_dict() for r in (*self._cross, *diag)]

    def seconds_per_query(self) -> dict[str, float]:
        """Each method's seconds over the rows it scored."""
        rows = [*self._cross, *self._diagnostic]
        out = {}
        for m in self.methods:
            n = sum(m in r.scores for r in rows)
            out[m] = round(self._seconds[m] / n, 3) if n else 0.0
        return out

    # ----------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _clock(self, *methods: str | None) -> Iterator[None]:
        """Add the block's wall time to each method named (``None`` entries are ignored)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            for m in methods:
                if m is not None:
                    self._seconds[m] += time.perf_counter() - start

    def _method(self, kind: str, role: str) -> str | None:
        """The method of ``kind`` (``head``/``prototype``) on ``role``'s encoder, if it runs.

        On the pretrained encoder, ``kind`` also runs (unscored) for its atlas diagnostic.
        """
        name = kind if role == "pretrained" else f"{kind}_random"
        if name in self.methods:
            return name
        if role == "pretrained" and f"{kind}_atlas" in self.methods:
            return f"{kind}_atlas"
        return None

    def _target(self, row: Row, view: View, st: Structure) -> Target:
        return Target.of(row, view, st, self.settings.crop_size)

    def _diagnosed(self, st: Structure) -> bool:
        """Whether the identity and intra-scan rows of ``st`` run (``--quick``: a few only)."""
        quick = self.settings.quick and st.name not in QUICK_DIAGNOSTICS
        return not (self.cross_only or quick)

    def _score(self, target: Target, method: str, pred: np.ndarray) -> None:
        target.row.scores[method] = score(pred, target.truth, target.box)

    def _to_native(
        self, values: np.ndarray, view: View, threshold: float, order: int = 1
    ) -> np.ndarray:
        scan = view.scan
        pred = native_mask(
            values, view.pre_affine, scan.image.shape, scan.image.affine, threshold, order
        )
        region = view.native_region
        return pred if region is None else pred & region

    def _encode(self, image: np.ndarray) -> dict[str, WindowFeatures]:
        windows = {}
        for role in self._roles:
            with self._clock(self._method("head", role), self._method("prototype", role)):
                windows[role] = self.roles.encoders[role].windows(image)
        return windows

    def _warp(self, support: str, query: str) -> np.ndarray:
        """The support's labels on the query's native grid, through their registration."""
        cfg = self.settings.registration
        for key in (support, query):
            if key not in self._working:
                img = self.prepared[key].image
                self._working[key] = working_image(
                    img.array, img.affine, self.prepared[key].scan.modality, cfg.spacing
                )
        reg = register_atlas(self._working[support], self._working[query], cfg)
        s, q = self.prepared[support], self.prepared[query]
        return warp_labels(reg, s.labels, s.image.affine, q.image.shape, q.image.affine)

    def _similarities(
        self, windows: dict[str, WindowFeatures], sets: Sequence[dict[str, list[Reference]]]
    ) -> dict[str, np.ndarray]:
        """Per role running the prototype method: ``(P, x, y, z)`` maps of ``P`` support sets."""
        sims = {}
        for role in self._roles:
            proto = self._method("prototype", role)
            if proto is not None:
                with self._clock(proto):
                    em = self.roles.encoders[role]
                    sims[role] = em.similarity(windows[role], [s[role] for s in sets])
        return sims

    def _encoder_methods(
        self,
        target: Target,
        windows: dict[str, WindowFeatures],
        refs: dict[str, list[Reference]],
        sims: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Score the head and prototype methods of every role on one query view.

        ``sims[role]`` is the ``(x, y, z)`` similarity map to the supports' mean prototype
        (computed for several rows in one sweep by the caller).

        Returns:
            The native masks of the pretrained ``head`` and ``prototype`` (when they ran), for
            the atlas-localised diagnostics.
        """
        masks = {}
        for role, em in ((r, self.roles.encoders[r]) for r in self._roles):
            proto, head = self._method("prototype", role), self._method("head", role)
            if proto is not None:
                with self._clock(proto):
                    thr = float(np.mean([r.threshold for r in refs[role]]))
                    pred = self._to_native(sims[role], target.view, thr)
                    if proto not in ATLAS_OF:
                        self._score(target, proto, pred)
                    if role == "pretrained":
                        masks["prototype"] = pred
            if head is not None:
                with self._clock(head):
                    prob = em.head_probabilities(windows[role], refs[role])
                    pred = self._to_native(prob, target.view, self.settings.threshold)
                    if head not in ATLAS_OF:
                        self._score(target, head, pred)
                    if role == "pretrained":
                        masks["head"] = pred
                if role == "pretrained":
                    self._pretrained_head(target, prob, pred)
        return masks

    def _pretrained_head(self, target: Target, prob: np.ndarray, pred: np.ndarray) -> None:
        """A hook: the pretrained head's encoder-grid map and native mask of every query row."""

    def _intensity(self, target: Target, supports: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if "intensity" in self.methods:
            with self._clock("intensity"):
                view = target.view
                pre = intensity_mask(supports, view.pre_image, self.settings.intensity_k)
                pred = self._to_native(pre.astype(np.float32), view, 0.5, order=0)
                self._score(target, "intensity", pred)

    def _done(self, row: Row) -> None:
        if self.log is not None:
            dice = ", ".join(f"{m} {s['dice']:.3f}" for m, s in row.scores.items())
            self.log(
                f"fewshot | {row.group} {row.structure.name}: {'+'.join(row.supports)} -> "
                f"{row.query}: {dice}"
            )

    # ----------------------------------------------------------------------------- passes

    def run(self) -> None:
        """Pass 1 over the support scans, then pass 2 over the query scans."""
        start = time.perf_counter()
        for key, structures in self._supports.items():
            self._support_pass(self.prepared[key], structures)
        mid = time.perf_counter()
        for key in dict.fromkeys(r.query for r in self._cross):
            self._query_pass(self.prepared[key], [r for r in self._cross if r.query == key])
        first = "supports" if self.cross_only else "supports, identity and intra-scan"
        self.stage_seconds = {first: round(mid - start, 1)}
        self.stage_seconds["cross-scan queries"] = round(time.perf_counter() - mid, 1)

    def _cut(self, scan: PreparedScan, st: Structure) -> Cut | None:
        """The intra-scan halves of a structure, or ``None`` when a half holds too little."""
        if not self._diagnosed(st):
            return None
        cut = halves(scan, st)
        if cut is None:
            return None
        lower, upper = cut
        if (
            min(int(lower.truth(st).sum()), int(upper.truth(st).sum()))
            < self.settings.min_voxels / 2
        ):
            return None
        return Cut(lower, upper, support_mask(lower, st))

    def _support_pass(self, scan: PreparedScan, structures: list[Structure]) -> None:
        """References and thresholds of a support scan's structures; identity and intra rows."""
        key, view = scan.scan.key, whole(scan)
        windows = self._encode(scan.pre_image)
        masks = [support_mask(view, st) for st in structures]
        cuts = [self._cut(scan, st) for st in structures]
        refs: dict[str, list[Reference]] = {}
        lows: dict[str, list[Reference | None]] = {}
        sims: dict[str, np.ndarray] = {}
        for role in self._roles:
            em, proto = self.roles.encoders[role], self._method("prototype", role)
            with self._clock(self._method("head", role), proto):
                refs[role] = [em.reference(scan.pre_image, m) for m in masks]
                lows[role] = [em.reference(c.lower.pre_image, c.mask) if c else None for c in cuts]
            for st, ref in zip(structures, refs[role], strict=True):
                self._refs[(role, key, st.name)] = ref
            if proto is None:
                continue
            with self._clock(proto):  # one sweep: every prototype's map on the support itself
                halves_ = [(c, r) for c, r in zip(cuts, lows[role], strict=True) if c and r]
                sets = [[r] for r in refs[role]] + [[r] for _, r in halves_]
                sim = em.similarity(windows[role], sets)
                for i, ref in enumerate(refs[role]):
                    ref.threshold = best_threshold(sim[i], masks[i])
                for j, (c, r) in enumerate(halves_, start=len(masks)):
                    r.threshold = best_threshold(sim[j][c.lower.box], c.mask)
                sims[role] = sim[: len(masks)]
        for i, st in enumerate(structures):
            if not self._diagnosed(st):
                continue
            row = Row(
                "identity", scan.scan.group, st, (key,), key, [scan.voxels(st)], scan.voxels(st)
            )
            target = self._target(row, view, st)
            one = {role: [refs[role][i]] for role in self._roles}
            self._encoder_methods(target, windows, one, {r: v[i] for r, v in sims.items()})
            self._intensity(target, [(scan.pre_image, masks[i])])
            self._diagnostic.append(row)
            self._done(row)
            cut = cuts[i]
            if cut is not None:
                low = {role: lows[role][i] for role in self._roles}
                self._intra(scan, st, cut, low)

    def _intra(
        self, scan: PreparedScan, st: Structure, cut: Cut, refs: dict[str, Reference]
    ) -> None:
        """The intra-scan row of one structure: lower half supports, upper half is the query."""
        key, axis = scan.scan.key, "xyz"[int(cut.upper.axis or 0)]
        truth = cut.upper.truth(st)
        row = Row(
            "intra-scan",
            scan.scan.group,
            st,
            (f"{key} (lower {axis})",),
            f"{key} (upper {axis})",
            [int(cut.lower.truth(st).sum())],
            int(truth.sum()),
        )
        target = self._target(row, cut.upper, st)
        windows = self._encode(cut.upper.pre_image)
        sims = {
            r: v[0]
            for r, v in self._similarities(windows, [{r: [v] for r, v in refs.items()}]).items()
        }
        self._encoder_methods(target, windows, {r: [v] for r, v in refs.items()}, sims)
        self._intensity(target, [(cut.lower.pre_image, cut.mask)])
        self._diagnostic.append(row)
        self._done(row)

    def _query_pass(self, scan: PreparedScan, rows: list[Row]) -> None:
        """Every cross-scan row whose query is ``scan``: one encoding, one similarity sweep."""
        view = whole(scan)
        windows = self._encode(scan.pre_image)
        refs = [
            {
                role: [self._refs[(role, s, r.structure.name)] for s in r.supports]
                for role in self._roles
            }
            for r in rows
        ]
        sims = self._similarities(windows, refs)
        warps: dict[str, np.ndarray] = {}
        for i, row in enumerate(rows):
            st = row.structure
            target = self._target(row, view, st)
            masks = self._encoder_methods(
                target, windows, refs[i], {r: v[i] for r, v in sims.items()}
            )
            supports = [self.prepared[s] for s in row.supports]
            self._intensity(target, [(s.pre_image, support_mask(whole(s), st)) for s in supports])
            atlas = [m for m in ATLAS_OF if m in self.methods]
            if "registration" in self.methods or atlas:
                with self._clock("registration", *atlas):
                    for s in row.supports:
                        if s not in warps:
                            warps[s] = self._warp(s, scan.scan.key)
                    pred = majority_vote([np.isin(warps[s], st.ids) for s in row.supports])
                if "registration" in self.methods:
                    self._score(target, "registration", pred)
                if atlas:
                    region = within_mm(pred, scan.image.spacing, self.settings.atlas_margin_mm)
                    for m in atlas:
                        self._score(target, m, masks[ATLAS_OF[m]] & region)
            self._done(row)
