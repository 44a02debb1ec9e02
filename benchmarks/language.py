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

The pieces: :mod:`~omnienc.benchmarks.language_lm` (the LM),
:mod:`~omnienc.benchmarks.language_scores` (the scores), :mod:`~omnienc.benchmarks.language_report`
(the tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

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
    align,
    encode_tokens,
    load_encoder_spec,
    load_vision_language,
    paired_dataset,
)
from omnienc.benchmarks.language_lm import TextLMConfig, train_text_lm
from omnienc.benchmarks.language_report import format_markdown
from omnienc.benchmarks.language_scores import CONDITIONS, evaluate
from omnienc.benchmarks.machine import cpu_model, cpu_seconds
from omnienc.benchmarks.report import write_report
from omnienc.checkpoint import load_checkpoint_config
from omnienc.errors import CheckpointError

KINDS = ("resampler", "mlp")


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
    text = format_markdown(payload, payload["command"])
    write_report(args.out, payload, text)
    print(text)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
