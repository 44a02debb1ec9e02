"""Does image information pass through the language projector? Image vs zero vs shuffled prefix.

    python -m omnienc.benchmarks.language --out benchmarks/results/language

The run, all on CPU:

1. Paired data with **templated** text from real labels (:mod:`omnienc.adapters.language`):
   AdrenalMNIST3D 28^3 (official train split / held-out test split) and 64 x 64 x 32 mm crops of
   real TotalSegmentator CT/MR volumes (training crops from three volumes, held-out crops from a
   fourth scan never seen in training).
2. A small GPT-2-config decoder (:func:`train_text_lm`: 2 layers, width 128, byte-level BPE
   trained on the same corpus) learns the training texts alone, with no image.
3. For the encoder under test and a random-init encoder of the same shape (the floor), each
   projector kind is aligned (:func:`omnienc.adapters.language.align`, the ``omnienc align``
   path, with the frozen LM) for several seeds, exported, and loaded back.
4. On the held-out items, the LM is run with the projected image prefix, a zero prefix, and the
   image prefix of another held-out item of the same source (shuffled), and scored by
   * label accuracy of the greedy text: the AdrenalMNIST3D class (accuracy, balanced accuracy),
     the structures named for a crop (F1 against the label map's set, and exact match);
   * volume-to-text retrieval recall@1: the held-out candidate text (unique texts of the source)
     with the highest LM log-likelihood given the prefix is the item's own text;
   * for AdrenalMNIST3D, the AUC of log p(hyperplasia text) - log p(normal text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from omnienc.adapters.language import (
    ADRENAL,
    DEFAULT_PROMPT,
    TOTALSEG,
    TOTALSEG_TEST,
    TOTALSEG_TRAIN,
    AlignConfig,
    PairedDataConfig,
    ProjectorConfig,
    TokenSet,
    VisionLanguageModel,
    align,
    collate_tokens,
    encode_tokens,
    load_encoder_spec,
    load_vision_language,
    paired_dataset,
    parse_adrenal_report,
    parse_crop_report,
)
from omnienc.atomic import fsync_dir, temp_sibling, write_bytes_atomic
from omnienc.benchmarks.machine import cpu_model, cpu_seconds
from omnienc.checkpoint import load_checkpoint_config
from omnienc.errors import CheckpointError
from omnienc.optim import adamw_warmup_cosine, decay_groups

CONDITIONS = ("image", "zero", "shuffled")
KINDS = ("resampler", "mlp")


# ---------------------------------------------------------------------- a small text-only LM


@dataclass(frozen=True)
class TextLMConfig:
    """A small GPT-2-config decoder and its byte-level BPE tokenizer, trained on a text corpus.

    Attributes:
        vocab_size: Largest BPE vocabulary (training stops earlier when no merge is left).
        n_layer: Transformer blocks.
        n_embd: Hidden size ``H``.
        n_head: Attention heads.
        n_positions: Context length; training windows are this long.
        steps: Optimizer steps.
        batch_size: Windows per step.
        lr: Peak AdamW learning rate (warm-up, cosine decay to 5 %).
        warmup_steps: Linear warm-up steps.
        seed: Seeds weights, shuffling and windows.
    """

    vocab_size: int = 1024
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0


def train_text_lm(
    texts: Sequence[str],
    folder: str | Path,
    config: TextLMConfig | None = None,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a small GPT-2 decoder on texts and save it as a Hugging Face folder.

    The tokenizer is a byte-level BPE (GPT-2's kind) trained on the same texts, so its
    vocabulary is a few hundred tokens and the output layer is cheap on a CPU (GPT-2's own
    50,257-token vocabulary would make every LM step about 20 times slower here). Documents are
    ``[eos][prompt][ text][eos]``, as :class:`~omnienc.adapters.language.VisionLanguageModel`
    lays them out after its prefix, concatenated in shuffled order and cut into
    ``n_positions``-token windows at random offsets, so every position of the context is trained.

    Args:
        texts: The corpus (repeats keep their frequency).
        folder: Output folder; replaced if it holds an earlier ``train_text_lm`` result.
        config: Model and training settings.
        prompt: The prompt the aligned model will use.
        progress: Show a progress bar.

    Returns:
        What is recorded in ``folder/omnienc_lm.json``: corpus size, settings, final loss, time.

    Raises:
        CheckpointError: ``folder`` exists and is not an earlier ``train_text_lm`` folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    config = config or TextLMConfig()
    folder = Path(folder)
    if folder.exists() and not (folder / "omnienc_lm.json").is_file():
        raise CheckpointError(folder, "exists and is not a train_text_lm folder; not replacing it")
    if not texts:
        raise ValueError("train_text_lm needs a non-empty corpus")
    start = time.perf_counter()
    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [f"{prompt} {t}" for t in texts],
        trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            special_tokens=[eos],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos)
    eos_id = int(tokenizer.eos_token_id)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_ids = [eos_id, *ids(prompt)]
    docs = [[*prompt_ids, *ids(" " + t.strip()), eos_id] for t in texts]
    rng = np.random.default_rng(config.seed)
    window = config.n_positions
    n_tokens = sum(len(d) for d in docs)
    passes = max(1, math.ceil(2 * window / n_tokens))
    stream = torch.tensor(
        [t for _ in range(passes) for i in rng.permutation(len(docs)) for t in docs[i]]
    )
    if len(stream) <= window:
        stream = stream.repeat(math.ceil((window + 1) / len(stream)))

    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    opt = adamw_warmup_cosine(
        decay_groups(model, config.lr, 0.01), config.warmup_steps, config.steps, 0.05
    )
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(config.steps), desc="text LM", disable=not progress, unit="step"):
        offsets = torch.randint(0, len(stream) - window, (config.batch_size,), generator=gen)
        batch = torch.stack([stream[o : o + window] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"text LM: non-finite loss at step {len(losses)}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    record = {
        "what": "small GPT-2-config decoder trained by omnienc.benchmarks.language.train_text_lm",
        "texts": len(texts),
        "unique_texts": len(set(texts)),
        "corpus_tokens": n_tokens,
        "vocab_size": len(tokenizer),
        "prompt": prompt,
        "config": asdict(config),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(time.perf_counter() - start, 1),
    }
    tmp = temp_sibling(folder)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "omnienc_lm.json").write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


# ------------------------------------------------------------------------------- evaluation


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


# -------------------------------------------------------------------------------------- run


def _checkpoint_sha(spec: str) -> str | None:
    try:
        return str(load_checkpoint_config(spec)["weights"]["sha256"])
    except (CheckpointError, KeyError, TypeError):
        return None


def run_language_benchmark(
    encoder_spec: str,
    work_dir: Path,
    *,
    kinds: Sequence[str] = KINDS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 1e-3,
    num_prefix: int = 8,
    lm_config: TextLMConfig | None = None,
    data: PairedDataConfig | None = None,
    data_root: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole measured run (see the module docstring); returns a JSON-able payload."""
    start = time.perf_counter()
    busy0, own0 = cpu_seconds()
    data = data or PairedDataConfig(sources=[ADRENAL, TOTALSEG])
    lm_config = lm_config or TextLMConfig()
    _, pre, info = load_encoder_spec(encoder_spec)
    floor = f"random:{info['arch']}:0"
    train_sets = paired_dataset(data, "train", pre, data_root, progress)
    test_sets = paired_dataset(data, "test", pre, data_root, progress)
    n_train = {k: len(v) for k, v in train_sets.items()}
    n_test = {k: len(v) for k, v in test_sets.items()}
    log(f"paired items: train {n_train}, test {n_test}")

    encoders: dict[str, tuple[TokenSet, TokenSet]] = {}
    for name, spec in (("pretrained", encoder_spec), ("random-init", floor)):
        enc, _, _ = load_encoder_spec(spec)
        t0 = time.perf_counter()
        train_tokens = TokenSet([], [], [], [], [])
        test_tokens = TokenSet([], [], [], [], [])
        for sets, target in ((train_sets, train_tokens), (test_sets, test_tokens)):
            for ds in sets.values():
                part = encode_tokens(enc, ds, progress=progress)
                for attr in ("tokens", "positions", "texts", "ids", "metas"):
                    getattr(target, attr).extend(getattr(part, attr))
        encoders[name] = (train_tokens, test_tokens)
        log(f"{name} ({spec}): tokens in {time.perf_counter() - t0:.0f} s")

    corpus = encoders["pretrained"][0].texts
    lm_dir = work_dir / "lm"
    lm_record = train_text_lm(corpus, lm_dir, lm_config, DEFAULT_PROMPT, progress)
    log(
        f"text LM: {lm_record['vocab_size']} tokens, loss {lm_record['final_loss']:.3f}, "
        f"{lm_record['seconds']:.0f} s"
    )

    runs = []
    for name, spec in (("pretrained", encoder_spec), ("random-init", floor)):
        train_tokens, test_tokens = encoders[name]
        for kind in kinds:
            for seed in seeds:
                run_dir = work_dir / f"{name}-{kind}-s{seed}"
                config = AlignConfig(
                    encoder=spec,
                    lm=str(lm_dir),
                    projector=ProjectorConfig(kind=kind, num_prefix=num_prefix),
                    data=data,
                    batch_size=batch_size,
                    lr=lr,
                    trainer={"max_steps": steps, "accelerator": "cpu"},
                    run_dir=str(run_dir),
                    data_root=data_root,
                    seed=seed,
                )
                t0 = time.perf_counter()
                folder = align(config, tokens=train_tokens, progress=progress)
                model, _, _, pconfig = load_vision_language(run_dir / "encoder", lm_dir, folder)
                scores = evaluate(model, test_tokens, config.max_new_tokens, seed)
                runs.append(
                    {
                        "encoder": name,
                        "spec": spec,
                        "kind": kind,
                        "seed": seed,
                        "final_loss": pconfig["meta"]["final_loss"],
                        "train_seconds": pconfig["meta"]["train_seconds"],
                        "seconds": round(time.perf_counter() - t0, 1),
                        "scores": scores,
                    }
                )
                img = scores["image"]
                log(
                    f"{name} {kind} seed {seed}: loss {pconfig['meta']['final_loss']:.3f}; "
                    + "; ".join(
                        f"{c}: adrenal bal.acc {scores[c][ADRENAL]['balanced_accuracy']:.3f} "
                        f"R@1 {scores[c][ADRENAL]['recall_at_1']:.3f}, crops F1 "
                        f"{scores[c][TOTALSEG]['structure_f1']:.3f} "
                        f"R@1 {scores[c][TOTALSEG]['recall_at_1']:.3f}"
                        for c in CONDITIONS
                        if c in scores and ADRENAL in img and TOTALSEG in img
                    )
                )
    busy1, own1 = cpu_seconds()
    wall = time.perf_counter() - start
    return {
        "encoder": encoder_spec,
        "encoder_sha256": _checkpoint_sha(encoder_spec),
        "floor": floor,
        "data": asdict(data),
        "split": {
            ADRENAL: "AdrenalMNIST3D 28^3: official train split for the LM corpus and alignment, "
            "official test split held out",
            TOTALSEG: "train crops from "
            + ", ".join(v.image for v in TOTALSEG_TRAIN)
            + f" (stride {data.train_stride}); held-out crops from "
            + ", ".join(v.image for v in TOTALSEG_TEST)
            + f" (stride {data.test_stride}), another scan never seen in training",
        },
        "n_train": n_train,
        "n_test": n_test,
        "lm": {**lm_record, "folder": str(lm_dir)},
        "align": {"steps": steps, "batch_size": batch_size, "lr": lr, "num_prefix": num_prefix},
        "kinds": list(kinds),
        "seeds": list(seeds),
        "runs": runs,
        "seconds": round(wall, 1),
        "other_cpu_share": round(max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall, 1e-9), 2),
        "machine": {
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }


# ----------------------------------------------------------------------------------- report


def _cell(runs: list[dict[str, Any]], cond: str, source: str, key: str) -> str:
    vals = [r["scores"][cond][source][key] for r in runs]
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


def format_markdown(payload: dict[str, Any], command: str) -> str:
    """The Markdown report of :func:`run_language_benchmark`'s payload."""
    m = payload["machine"]
    lm = payload["lm"]
    cfg = lm["config"]
    sha = payload["encoder_sha256"]
    seeds = payload["seeds"]
    lines = [
        "# Language adapter: does image information pass through the projector?",
        "",
        f"Command: `{command}`  ",
        f"Date: {m['date']}; machine: {m['cpu']}, {m['torch_threads']} torch threads, no GPU; "
        f"python {m['python']}, torch {m['torch']}; {payload['seconds'] / 60:.1f} min in all "
        f"(other processes used {100 * payload['other_cpu_share']:.0f}% of one core's time on "
        "average).  ",
        f"Encoder: `{payload['encoder']}`"
        + (f" (weights sha256 `{sha[:16]}…`)" if sha else "")
        + f"; floor: `{payload['floor']}` (random-init, same shape).",
        "",
        "**All text here is templated**, made from real labels, not written by a radiologist: "
        "no radiology reports are reachable on this machine. AdrenalMNIST3D items read "
        "`AdrenalMNIST3D adrenal shape mask: {normal|hyperplasia}.` (class names from the "
        "medmnist package); crops read `{CT|MR} of the {region}. Structures: {a, b, ...}.`, "
        "naming the structures with at least "
        f"{payload['data']['min_voxels']} voxels in the crop from the TotalSegmentator label map "
        "(grouped terms: kidney, bowel, spine, ...; ribs, muscles and veins are not named). "
        "The numbers measure whether the frozen encoder's tokens, through the projector, steer "
        "a language model to the right labels; they say nothing about report writing.",
        "",
        "## Set-up",
        "",
        f"- Split: {payload['split'][ADRENAL]}; {payload['split'][TOTALSEG]}. Items: train "
        f"{payload['n_train']}, held out {payload['n_test']}. Crops are "
        + " x ".join(str(c) for c in payload["data"]["crop_size"])
        + " voxels at the encoder's 2 mm preprocessing.",
        f"- Language model: a GPT-2-config decoder ({cfg['n_layer']} layers, width "
        f"{cfg['n_embd']}, {cfg['n_head']} heads, context {cfg['n_positions']}) with a "
        f"byte-level BPE tokenizer ({lm['vocab_size']} tokens) trained on the "
        f"{lm['texts']} training texts ({lm['unique_texts']} distinct) alone, "
        f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['n_positions']}-token windows, "
        f"final loss {lm['final_loss']:.3f}, {lm['seconds']:.0f} s "
        "(`omnienc.benchmarks.language.train_text_lm`; saved under "
        f"`{lm['folder']}`, git-ignored). Frozen during alignment.",
        f"- Alignment (`omnienc.adapters.language.align`, the `omnienc align` path): "
        f"{payload['align']['steps']} steps of batch {payload['align']['batch_size']}, AdamW lr "
        f"{payload['align']['lr']:g}, {payload['align']['num_prefix']} prefix embeddings, "
        f"seeds {seeds}; the projector is exported and loaded back before testing.",
        "- Prefixes at test time: *image* = the projected tokens of the item; *zero* = "
        "all-zero prefix embeddings; *shuffled* = the image prefix of another held-out item of "
        "the same source (a random cycle). Greedy decoding.",
        "- Metrics on the held-out items. *bal. acc*: balanced accuracy of the AdrenalMNIST3D "
        "class the generated text states (a text that states none counts as wrong; plain "
        "accuracy is in the JSON). *structure F1*: mean per-crop F1 of the structures the "
        "generated text names against the label map's set (1 when both are empty); *exact*: "
        "the sets are equal. *R@1*: volume-to-text retrieval, the item's own text ranks first "
        "among the distinct held-out texts of its source (2 for AdrenalMNIST3D) by LM "
        "log-likelihood given the prefix (a tie among k counts 1/k). Raw likelihood favours "
        "texts the LM finds likely a priori (the majority class, short texts); *R@1 cal.* first "
        "subtracts each candidate text's mean log-likelihood over the held-out items, which "
        "removes that prior (a prefix that carries nothing then scores chance, 1/candidates). "
        "*lik. AUC*: AUC of log p(hyperplasia text) - log p(normal text) against the class.",
        "",
    ]
    for kind in payload["kinds"]:
        lines += [
            f"## Projector `{kind}`"
            + (f" (mean ± SD over seeds {seeds})" if len(seeds) > 1 else ""),
            "",
            "| encoder | prefix | Adrenal bal. acc | Adrenal R@1 | Adrenal R@1 cal. | Adrenal "
            "lik. AUC | crops structure F1 | crops exact | crops R@1 | crops R@1 cal. |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for enc in ("pretrained", "random-init"):
            runs = [r for r in payload["runs"] if r["encoder"] == enc and r["kind"] == kind]
            for cond in CONDITIONS:
                bold = "**" if enc == "pretrained" and cond == "image" else ""
                cells = [
                    _cell(runs, cond, ADRENAL, "balanced_accuracy"),
                    _cell(runs, cond, ADRENAL, "recall_at_1"),
                    _cell(runs, cond, ADRENAL, "recall_at_1_calibrated"),
                    _cell(runs, cond, ADRENAL, "likelihood_auc"),
                    _cell(runs, cond, TOTALSEG, "structure_f1"),
                    _cell(runs, cond, TOTALSEG, "exact_match"),
                    _cell(runs, cond, TOTALSEG, "recall_at_1"),
                    _cell(runs, cond, TOTALSEG, "recall_at_1_calibrated"),
                ]
                lines.append(f"| {bold}{enc}{bold} | {cond} | " + " | ".join(cells) + " |")
        lines.append("")
    first = payload["runs"][0]["scores"]
    ad, ts = first["image"][ADRENAL], first["image"][TOTALSEG]
    runs = payload["runs"]
    said_mass = np.mean(
        [r["scores"]["image"][ADRENAL]["predicted_counts"].get("hyperplasia", 0) for r in runs]
    )
    zero_parsed = np.mean([r["scores"]["zero"][ADRENAL]["parsed"] for r in runs])
    lines += [
        f"Held out: {ad['n']} AdrenalMNIST3D items ({ad['candidates']} candidate texts) and "
        f"{ts['n']} crops ({ts['candidates']} distinct candidate texts; chance recall@1 "
        f"{1 / ts['candidates']:.3f}). Per-run values, bootstrap 95% intervals and generated "
        "examples are in the JSON file beside this one.",
        "",
        "Reading the table (counts from this run):",
        "",
        f"- With the image prefix, greedy decoding stated *hyperplasia* for {said_mass:.1f} (mean "
        f"over runs) of the {ad['n']} held-out AdrenalMNIST3D items: the decoder "
        "writes the majority class unless the prefix makes the other class more likely than "
        "not, so the balanced accuracy of generated text stays near 0.5 and *lik. AUC* is the "
        "measure of whether class information reached the LM.",
        f"- With the zero prefix, {100 * zero_parsed:.0f}% of AdrenalMNIST3D items got a text "
        "that states a class (on average over runs); the others got the crop template, hence "
        "a balanced accuracy of 0 there.",
        "",
        "Generated examples (pretrained encoder, first run, image prefix):",
        "",
        "| item | templated truth | generated |",
        "|---|---|---|",
    ]
    for ex in first["examples"]:
        lines.append(f"| `{ex['id']}` | {ex['truth']} | {ex['generated']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnienc.benchmarks.language``."""
    p = argparse.ArgumentParser(
        prog="python -m omnienc.benchmarks.language",
        description="Image vs zero vs shuffled prefix through the language projector, for an "
        "encoder and its random-init floor, on templated text from real labels.",
    )
    p.add_argument("--encoder", default="checkpoints/omnienc-cpu30min")
    p.add_argument("--work", type=Path, default=Path("runs/language"), help="LM and align runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/language"))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="alignment steps per run")
    p.add_argument("--lm-steps", type=int, default=600, help="text-LM training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="alignment learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="alignment batch size")
    p.add_argument("--num-prefix", type=int, default=8, help="prefix embeddings P")
    p.add_argument(
        "--crop-size",
        nargs=3,
        type=int,
        default=list(PairedDataConfig().crop_size),
        help="crop voxels X Y Z (default %(default)s)",
    )
    p.add_argument("--max-items", type=int, help="cap per source and split (quick checks)")
    p.add_argument("--data", help="data root (default $OMNIENC_DATA or ../shared/data)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    data = PairedDataConfig(
        sources=[ADRENAL, TOTALSEG], crop_size=tuple(args.crop_size), max_items=args.max_items
    )
    payload = run_language_benchmark(
        args.encoder,
        args.work,
        kinds=args.kinds,
        seeds=args.seeds,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        num_prefix=args.num_prefix,
        lm_config=TextLMConfig(steps=args.lm_steps),
        data=data,
        data_root=args.data,
        progress=not args.quiet,
    )
    command = "python -m omnienc.benchmarks.language " + " ".join(
        list(sys.argv[1:] if argv is None else argv)
    )
    payload["command"] = command.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out.with_suffix(".json"), json.dumps(payload, indent=2).encode())
    text = format_markdown(payload, payload["command"])
    write_bytes_atomic(args.out.with_suffix(".md"), text.encode())
    print(text)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
