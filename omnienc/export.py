"""``omnienc export CKPT OUT``: a checkpoint as a folder ready to publish on the Hugging Face Hub.

The folder holds the checkpoint's ``config.json`` and safetensors files, copied byte for byte
(so the recorded sha256 still match and ``load_encoder(OUT)`` gives the same features), and a
model card ``README.md`` (:mod:`omnienc.model_card`). It is written like a checkpoint save:
under a hidden temporary name beside ``OUT``, fsync'd, then renamed into place, so ``OUT`` is
either the previous export or the complete new one. Upload it with
``hf upload ORG/NAME OUT`` and load it anywhere with ``load_encoder("hf-hub:ORG/NAME")``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.checkpoint_folder import CONFIG_FILE, write_checkpoint_folder, write_text_synced
from omnienc.errors import CheckpointError
from omnienc.hub import is_hub_id, resolve_checkpoint
from omnienc.model_card import find_run_config, load_run_config, read_bench_results
from omnienc.model_card import render_model_card as render_card

CARD_FILE = "README.md"


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    license: str = "other",
    results: Sequence[str | Path] = (),
    repo_id: str | None = None,
) -> Path:
    """Write a publishable folder: weights, ``config.json`` and a model card.

    Args:
        checkpoint: A checkpoint folder or a Hub id ``hf-hub:ORG/NAME[@REV]``.
        out: The folder to write; if it exists it must be an omnienc checkpoint or export (it
            is replaced) or empty.
        license: License id for the card's front matter, e.g. ``apache-2.0``.
        results: JSON files written by ``omnienc bench`` whose numbers the card shows.
        repo_id: The Hub id ``ORG/NAME`` it will be published under (for the card's examples).

    Returns:
        ``out``.

    Raises:
        CheckpointError: The checkpoint does not load (every check of :func:`load_encoder`),
            ``out`` is something else, or a results file was measured on other weights.
        DataError: A results file or the run's ``config.yaml`` cannot be read.
    """
    out = Path(out)
    source = resolve_checkpoint(checkpoint)
    config = load_checkpoint_config(source)
    load_encoder(source)  # checks every sha256 and that the weights fit the config
    run_config = None if is_hub_id(checkpoint) else load_run_config(find_run_config(source))
    benches = [read_bench_results(p) for p in results]
    weights = f"sha256:{config['weights']['sha256']}"
    for bench in benches:
        others = sorted(set(bench.checkpoints) - {weights})
        if others:
            raise CheckpointError(
                bench.path,
                f"was measured with encoder weights {others[0][:19]}…, not {checkpoint}'s "
                f"{weights[:19]}…; pass the results of this checkpoint",
            )
    if repo_id is not None and "/" not in repo_id:
        raise ValueError(f"repo_id must be ORG/NAME, got {repo_id!r}")
    card = render_card(
        config, license=license, run_config=run_config, results=benches, repo_id=repo_id
    )
    files = [CONFIG_FILE, config["weights"]["file"]]
    files += [entry["file"] for entry in (config.get("extra") or {}).values()]

    if out.resolve() == source.resolve():
        raise CheckpointError(out, "is the checkpoint itself; export to another folder")

    def fill(tmp: Path) -> None:
        for name in files:
            _copy_synced(source / name, tmp / name)
        write_text_synced(tmp / CARD_FILE, card)

    return write_checkpoint_folder(out, fill)
