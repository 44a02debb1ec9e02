"""The 2D map of a latent set and the numbers measured beside it.

:func:`umap_layout` is a seeded UMAP (McInnes et al., https://arxiv.org/abs/1802.03426;
umap-learn) with cosine distance on centred features. :func:`latent_metrics` measures, per
colouring: the silhouette (Rousseeuw 1987) in feature space (cosine) and in the 2D map
(Euclidean), the kNN accuracy of the colouring in feature space under stratified
cross-validation, and the trustworthiness of the 2D map (Venna & Kaski 2001), all with
scikit-learn.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnienc.adapters.latent.points import COLOURINGS, MISSING, UNKNOWN_MODALITY, LatentSet


def centred(features: np.ndarray) -> np.ndarray:
    """``features`` minus their mean over the points: ``(N, E)`` float64.

    Pooled activations after a leaky ReLU share a large common component, which makes every
    cosine similarity close to 1; distances here are cosine distances of centred features.
    """
    x = np.asarray(features, dtype=np.float64)
    return x - x.mean(axis=0, keepdims=True)


def umap_layout(
    features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1
) -> np.ndarray:
    """A seeded 2D UMAP of the centred features (cosine distance).

    Seeding makes umap-learn run single-threaded, so the map is the same on every run on one
    machine. The spectral initialisation needs a few points; below 16 the layout starts
    from a random (seeded) one.

    Args:
        features: ``(N, E)``, ``N >= 4``.
        seed: UMAP ``random_state``.
        n_neighbors: Neighbourhood size, capped at ``N - 1``.
        min_dist: UMAP ``min_dist``.

    Returns:
        ``(N, 2)`` float32 coordinates.

    Raises:
        ValueError: Fewer than 4 points.
    """
    n = len(features)
    if n < 4:
        raise ValueError(f"a UMAP needs at least 4 points, got {n}")
    import umap  # numba compiles on first use (~20 s); keep it out of import time

    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, n - 1)),
        min_dist=min_dist,
        metric="cosine",
        random_state=seed,
        init="spectral" if n >= 16 else "random",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", message=".*k >= N.*")
        return np.asarray(reducer.fit_transform(centred(features)), dtype=np.float32)


@dataclass
class ColouringMetrics:
    """How well one colouring is separated, on the points that have a value for it.

    Attributes:
        colouring: Name, e.g. ``modality`` or ``label within adrenalmnist3d 28``.
        n: Points measured (after leaving out missing values and singleton classes).
        classes: Class sizes of those points.
        left_out: Points without a value (missing, ``unknown`` modality) or in a class of one.
        silhouette_features: Mean silhouette, cosine distance on centred features.
        silhouette_2d: Mean silhouette, Euclidean distance in the 2D map.
        knn_accuracy: Accuracy of a cosine kNN classifier, stratified k-fold cross-validated.
        knn_balanced_accuracy: Its balanced accuracy (mean recall over classes).
        majority: Share of the largest class (the accuracy of always guessing it).
        folds: Cross-validation folds (``min(5, smallest class)``).
        k: Neighbours of the kNN classifier.
        note: Why a metric is missing, if one is.
    """

    colouring: str
    n: int
    classes: dict[str, int]
    left_out: int
    silhouette_features: float | None = None
    silhouette_2d: float | None = None
    knn_accuracy: float | None = None
    knn_balanced_accuracy: float | None = None
    majority: float | None = None
    folds: int | None = None
    k: int | None = None
    note: str = ""


def colouring_metrics(
    name: str,
    features: np.ndarray,
    coords: np.ndarray | None,
    values: Sequence[str],
    missing: Sequence[str] = (MISSING,),
    seed: int = 0,
    k: int = 5,
    max_folds: int = 5,
) -> ColouringMetrics:
    """Silhouettes and cross-validated kNN accuracy of one colouring.

    Points whose value is in ``missing`` are left out; so are classes with a single point,
    which can be neither a cross-validation test point's neighbour nor have a silhouette. The
    rest is split into ``min(max_folds, smallest class)`` stratified folds (shuffled, seeded);
    each fold is predicted by a cosine kNN on the other folds' centred features
    (``k`` capped by the smallest training fold), and the pooled predictions are scored.

    Args:
        name: The colouring's name in the result.
        features: ``(N, E)`` features (centred here, over all ``N`` points).
        coords: ``(N, 2)`` map coordinates, or ``None`` to skip the 2D silhouette.
        values: ``N`` class names.
        missing: Values that mean "no value".
        seed: Fold seed.
        k: kNN neighbours (before capping).
        max_folds: Most folds.

    Returns:
        The :class:`ColouringMetrics`; metrics stay ``None`` (with a ``note``) when fewer than
        two classes remain.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    x = centred(features)
    vals = np.asarray(list(values), dtype=object)
    if len(vals) != len(x):
        raise ValueError(f"{len(x)} feature rows but {len(vals)} values")
    counts = Counter(v for v in vals if v not in missing)
    keep = np.array([v not in missing and counts[v] >= 2 for v in vals], dtype=bool)
    y = vals[keep].astype(str)
    kept = Counter(y.tolist())
    result = ColouringMetrics(
        colouring=name, n=int(keep.sum()), classes=dict(kept), left_out=int((~keep).sum())
    )
    if len(kept) < 2:
        result.note = "fewer than two classes with two or more points"
        return result
    result.silhouette_features = float(silhouette_score(x[keep], y, metric="cosine"))
    if coords is not None:
        result.silhouette_2d = float(silhouette_score(np.asarray(coords)[keep], y))
    folds = min(max_folds, min(kept.values()))
    n = len(y)
    neighbours = max(1, min(k, n - math.ceil(n / folds)))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=neighbours, metric="cosine")
    pred = cross_val_predict(knn, x[keep], y, cv=cv)
    result.knn_accuracy = float(accuracy_score(y, pred))
    result.knn_balanced_accuracy = float(balanced_accuracy_score(y, pred))
    result.majority = max(kept.values()) / n
    result.folds, result.k = folds, neighbours
    return result


def trustworthiness_k(n: int, k: int = 10) -> int:
    """Neighbourhood for trustworthiness: ``k``, capped so that it stays below ``n / 2``."""
    return max(1, min(k, (n - 1) // 2))


@dataclass
class LatentMetrics:
    """The numbers beside one map.

    Attributes:
        n: Points in the map.
        trustworthiness: Of the 2D map against cosine neighbourhoods of the centred features.
        trustworthiness_k: Its neighbourhood size.
        colourings: One :class:`ColouringMetrics` per colouring, then the label and group within
            each dataset where they are measurable.
    """

    n: int
    trustworthiness: float
    trustworthiness_k: int
    colourings: list[ColouringMetrics] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable."""
        return dataclasses.asdict(self)


def latent_metrics(latent: LatentSet, coords: np.ndarray, seed: int = 0) -> LatentMetrics:
    """Trustworthiness of the map and the separation of every colouring.

    Colourings: ``modality`` (``unknown`` left out), ``dataset``, ``label`` and ``group`` (whole
    volumes left out), then ``label within D`` and ``group within D`` for every dataset ``D``
    where they are measurable (two classes of two or more points): the separation that does not
    come from telling datasets apart. A group row is left out where it equals the label.

    Args:
        latent: The points.
        coords: ``(N, 2)`` map coordinates.
        seed: Fold seed.

    Returns:
        The :class:`LatentMetrics`.
    """
    from sklearn.manifold import trustworthiness

    x = centred(latent.features)
    k = trustworthiness_k(len(latent))
    result = LatentMetrics(
        n=len(latent),
        trustworthiness=float(trustworthiness(x, coords, n_neighbors=k, metric="cosine")),
        trustworthiness_k=k,
    )
    for name in COLOURINGS:
        missing = (MISSING, UNKNOWN_MODALITY) if name == "modality" else (MISSING,)
        result.colourings.append(
            colouring_metrics(name, latent.features, coords, latent.column(name), missing, seed)
        )
    datasets = np.asarray(latent.dataset)
    for d in sorted(set(latent.dataset)):
        rows = np.flatnonzero(datasets == d)
        labels = [latent.label[i] for i in rows]
        groups = [latent.group[i] for i in rows]
        for name, values in (("label", labels), ("group", groups)):
            if name == "group" and groups == labels:
                continue  # MedMNIST: the group is the label
            m = colouring_metrics(
                f"{name} within {d}", latent.features[rows], coords[rows], values, seed=seed
            )
            if m.knn_accuracy is not None:
                result.colourings.append(m)
    return result
