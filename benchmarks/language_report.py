"""The language benchmark's Markdown: every condition, projector kind and encoder, with CIs."""

from __future__ import annotations

from typing import Any

import numpy as np

from omnienc.adapters.language import ADRENAL, TOTALSEG
from omnienc.benchmarks.language_scores import CONDITIONS

# ----------------------------------------------------------------------------------- report


def _cell(runs: list[dict[str, Any]], cond: str, source: str, key: str) -> str:
    vals = [r["scores"][cond][source][key] for r in runs]
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


def format_markdown(payload: dict[str, Any], command: str) -> str:
    """The Markdown report of :func:`~omnienc.benchmarks.language.run_language_benchmark`."""
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
