"""How the language benchmark scores a projector: generated text, retrieval and AUC per condition.

On the held-out items the LM runs with the projected image prefix, a zero prefix, and the image
prefix of another held-out item of the same source (shuffled); :func:`evaluate` scores each:

* label accuracy of the greedy text: the AdrenalMNIST3D class (accuracy, balanced accuracy),
  the structures named for a crop (F1 against the label map's set, and exact match);
* volume-to-text retrieval recall@1: the held-out candidate text (unique texts of the source)
  with the highest LM log-likelihood given the prefix is the item's own text;
* for AdrenalMNIST3D, the AUC of log p(hyperplasia text) - log p(normal text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from omnienc.adapters.language import (
    ADRENAL,
    TokenSet,
    VisionLanguageModel,
    collate_tokens,
    parse_adrenal_report,
    parse_crop_report,
)

# ------------------------------------------------------------------------------- evaluation

CONDITIONS = ("image", "zero", "shuffled")


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.inference_mode()
def image_prefixes(model: VisionLanguageModel, tokens: TokenSet, batch: int = 256) -> torch.Tensor:
    """Projected prefixes ``(N, P, H)`` of every item."""
    out = []
    for s in _batches(len(tokens), batch):
        b = collate_tokens([tokens[i] for i in range(s.start, s.stop)])
        out.append(model.prefix(b["tokens"], b["mask"], b["positions"]).float())
    return torch.cat(out)


def shuffled_rows(groups: Sequence[str], seed: int) -> np.ndarray:
    """A permutation that sends every item to another item of its group (no fixed points)."""
    rng = np.random.default_rng(seed)
    perm = np.arange(len(groups))
    for g in sorted(set(groups)):
        rows = np.flatnonzero(np.asarray(groups) == g)
        if len(rows) > 1:
            shift = rng.permutation(len(rows))  # a random cycle: item k -> item k + 1
            perm[rows[shift]] = rows[np.roll(shift, -1)]
    return perm


@torch.inference_mode()
def generate_texts(
    model: VisionLanguageModel, prefixes: torch.Tensor, max_new_tokens: int, batch: int = 128
) -> list[str]:
    """Greedy text for every prefix."""
    texts: list[str] = []
    for s in _batches(len(prefixes), batch):
        texts += model.generate(prefixes[s], max_new_tokens)
    return texts


@torch.inference_mode()
def candidate_logprobs(
    model: VisionLanguageModel, prefixes: torch.Tensor, candidates: Sequence[str], batch: int = 512
) -> np.ndarray:
    """``(N, C)`` log-likelihood of every candidate text given every prefix."""
    n, c = len(prefixes), len(candidates)
    pairs = [(i, j) for i in range(n) for j in range(c)]
    out = np.zeros((n, c))
    for s in _batches(len(pairs), batch):
        chunk = pairs[s]
        pre = prefixes[[i for i, _ in chunk]]
        logp = model.sequence_logprob(pre, [candidates[j] for _, j in chunk])
        for (i, j), v in zip(chunk, logp.tolist(), strict=True):
            out[i, j] = v
    return out


def bootstrap_ci(
    n: int, stat: Callable[[np.ndarray], float], reps: int = 1000, seed: int = 0
) -> list[float]:
    """95% percentile bootstrap interval of ``stat(rows)`` over ``n`` items."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(reps)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def retrieval_hits(scores: np.ndarray, own: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """Per-item recall@1 of ``(N, C)`` scores; a tie among ``k`` best candidates counts ``1/k``.

    Scores within ``tol`` nats of the best tie (batching changes float sums by ~1e-6).
    """
    best = scores.max(axis=1, keepdims=True)
    top = scores >= best - tol
    return top[np.arange(len(own)), own] / top.sum(axis=1)


def calibrated(scores: np.ndarray) -> np.ndarray:
    """Scores minus each candidate's mean over the items: removes the text prior of the LM."""
    return scores - scores.mean(axis=0, keepdims=True)


def _balanced_accuracy(pred: np.ndarray, truth: np.ndarray, rows: np.ndarray) -> float:
    recalls = [float(np.mean(pred[rows][truth[rows] == c] == c)) for c in np.unique(truth[rows])]
    return float(np.mean(recalls))


def _f1(pred: set[str], truth: set[str]) -> float:
    if not pred and not truth:
        return 1.0
    tp = len(pred & truth)
    return 2 * tp / (len(pred) + len(truth))


def adrenal_scores(
    generated: Sequence[str], metas: Sequence[dict[str, Any]], logp: np.ndarray, cands: list[str]
) -> dict[str, Any]:
    """Label accuracy of the generated class, recall@1, and the likelihood-ratio AUC."""
    names = sorted(
        {m["class"] for m in metas}, key=lambda c: min(m["label"] for m in metas if m["class"] == c)
    )
    truth = np.array([m["label"] for m in metas])
    parsed = [parse_adrenal_report(t, names) for t in generated]
    pred = np.array([names.index(p) if p is not None else -1 for p in parsed])
    own = np.array([cands.index(m["text"]) for m in metas])
    hit = retrieval_hits(logp, own)
    hit_cal = retrieval_hits(calibrated(logp), own)
    # log p(positive-class text) - log p(negative-class text)
    pos_text = next(m["text"] for m in metas if m["label"] == 1)
    neg_text = next(m["text"] for m in metas if m["label"] == 0)
    margin = logp[:, cands.index(pos_text)] - logp[:, cands.index(neg_text)]
    n = len(truth)
    all_rows = np.arange(n)

    def auc(rows: np.ndarray) -> float:
        t = truth[rows]
        return float(roc_auc_score(t, margin[rows])) if len(set(t.tolist())) > 1 else 0.5

    return {
        "n": n,
        "accuracy": float(np.mean(pred == truth)),
        "balanced_accuracy": _balanced_accuracy(pred, truth, all_rows),
        "balanced_accuracy_ci": bootstrap_ci(n, lambda r: _balanced_accuracy(pred, truth, r)),
        "parsed": float(np.mean(pred >= 0)),
        "recall_at_1": float(hit.mean()),
        "recall_at_1_ci": bootstrap_ci(n, lambda r: float(hit[r].mean())),
        "recall_at_1_calibrated": float(hit_cal.mean()),
        "candidates": len(cands),
        "likelihood_auc": auc(all_rows),
        "likelihood_auc_ci": bootstrap_ci(n, auc),
        "predicted_counts": {str(c): int(np.sum(pred == i)) for i, c in enumerate(names)},
    }


def crop_scores(
    generated: Sequence[str], metas: Sequence[dict[str, Any]], logp: np.ndarray, cands: list[str]
) -> dict[str, Any]:
    """Structure F1 / exact match / modality of the generated texts, and recall@1."""
    parsed = [parse_crop_report(t) for t in generated]
    f1 = np.array(
        [_f1(p["structures"], set(m["structures"])) for p, m in zip(parsed, metas, strict=True)]
    )
    exact = np.array(
        [p["structures"] == set(m["structures"]) for p, m in zip(parsed, metas, strict=True)]
    )
    modality = np.array(
        [p["modality"] == m["modality"] for p, m in zip(parsed, metas, strict=True)]
    )
    own = np.array([cands.index(m["text"]) for m in metas])
    hit = retrieval_hits(logp, own)
    hit_cal = retrieval_hits(calibrated(logp), own)
    n = len(metas)
    return {
        "n": n,
        "structure_f1": float(f1.mean()),
        "structure_f1_ci": bootstrap_ci(n, lambda r: float(f1[r].mean())),
        "exact_match": float(exact.mean()),
        "modality_accuracy": float(modality.mean()),
        "recall_at_1": float(hit.mean()),
        "recall_at_1_ci": bootstrap_ci(n, lambda r: float(hit[r].mean())),
        "recall_at_1_calibrated": float(hit_cal.mean()),
        "recall_at_1_calibrated_ci": bootstrap_ci(n, lambda r: float(hit_cal[r].mean())),
        "candidates": len(cands),
    }


def evaluate(
    model: VisionLanguageModel, tokens: TokenSet, max_new_tokens: int, seed: int = 0
) -> dict[str, Any]:
    """Scores of the image, zero and shuffled prefixes on held-out tokens, per source.

    Returns:
        ``{condition: {source: scores}}`` plus ``"examples"`` (a few generated texts).
    """
    model.eval()
    sources = [str(m["source"]) for m in tokens.metas]
    image = image_prefixes(model, tokens)
    prefixes = {
        "image": image,
        "zero": torch.zeros_like(image),
        "shuffled": image[torch.from_numpy(shuffled_rows(sources, seed))],
    }
    out: dict[str, Any] = {"examples": []}
    for cond in CONDITIONS:
        generated = generate_texts(model, prefixes[cond].to(image.dtype), max_new_tokens)
        out[cond] = {}
        for source in sorted(set(sources)):
            rows = [i for i, s in enumerate(sources) if s == source]
            metas = [{**tokens.metas[i], "text": tokens.texts[i]} for i in rows]
            cands = sorted({tokens.texts[i] for i in rows})
            logp = candidate_logprobs(model, prefixes[cond][rows], cands)
            texts = [generated[i] for i in rows]
            scorer = adrenal_scores if source == ADRENAL else crop_scores
            out[cond][source] = scorer(texts, metas, logp, cands)
            if cond == "image":
                out["examples"] += [
                    {"id": tokens.ids[i], "truth": tokens.texts[i], "generated": generated[i]}
                    for i in rows[:: max(1, len(rows) // 4)][:4]
                ]
    return out
