"""Untrusted checkpoints and caches: pickle payloads are refused and never run; mismatches say why.

Each attack of :mod:`omnienc.benchmarks.robustness.badcheckpoints` hides a pickle payload (whose
``__reduce__`` creates a marker file) where a user could be handed it: a ``.pt``/``.ckpt``/
``.pth``/``.bin`` file given to ``load_encoder`` or ``omnienc embed/probe/segment``, pickle bytes
in a checkpoint folder's safetensors files (with a matching sha256), a ``config.json`` pointing
at a pickle or outside the folder, a run folder's ``last.ckpt`` that ``omnienc pretrain``
resumes from, and pickled arrays in shared cache files. Every one must be refused with an
omnienc error (or, for a cache entry, rebuilt with a warning) and the marker must not exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from omnienc.benchmarks.robustness.attacks import ATTACKS, AttackContext, run_attack
from omnienc.benchmarks.robustness.mismatches import MISMATCHES, run_mismatch
from omnienc.benchmarks.robustness.payloads import (
    PicklePayload,
    payload_is_live,
    write_pickle_checkpoint,
)
from omnienc.checkpoint import load_encoder
from omnienc.errors import CheckpointError
from omnienc.pretext.train import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("omnienc", "pretext", "adapters")


def test_the_payload_is_live(tmp_path: Path):
    """Unpickled unsafely the payload does create its marker: the refusals below are not vacuous."""
    assert payload_is_live(tmp_path)
    marker = tmp_path / "m"
    torch.load(write_pickle_checkpoint(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_and_nothing_runs(name: str, attack_context: AttackContext):
    result = run_attack(name, attack_context)
    assert result.refused, result.message
    assert not result.executed, f"{name}: the pickle payload ran"
    assert not list(attack_context.work.rglob("PAYLOAD-RAN"))
    # The refusal names the file or folder at fault (a path below this attack's scratch folder).
    assert str(attack_context.work) in result.message, result.message


def test_resume_loader_is_weights_only(tmp_path: Path):
    """The pretrain resume path unpickles nothing but tensors and plain containers."""
    marker = tmp_path / "ran"
    bad = write_pickle_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="only weights-only checkpoints") as info:
        AtomicCheckpointIO().load_checkpoint(bad)
    assert str(bad) in str(info.value)
    assert not marker.exists()


def test_nested_payload_in_a_checkpoint_folder_file(tmp_path: Path):
    """A pickle named .pt inside a folder is not even opened: only config.json is read."""
    folder = tmp_path / "ckpt"
    marker = tmp_path / "ran"
    write_pickle_checkpoint(folder / "model.pt", marker)
    with pytest.raises(CheckpointError, match=r"config\.json is missing") as info:
        load_encoder(folder)
    assert str(folder) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if "resumed" in n else n
        for n in MISMATCHES  # a resume needs two short training runs
    ],
)
def test_mismatched_checkpoint_says_what_differs(name: str, attack_context: AttackContext):
    result = run_mismatch(name, attack_context)
    assert result.refused, result.message


def test_vit_input_size_mismatch_message(attack_context: AttackContext):
    """The message names the folder, the config it builds, and the tensor that differs."""
    result = run_mismatch("ViT trained at 64^3, config.json says 32^3", attack_context)
    assert result.refused, result.message
    assert re.search(r"vit64: model\.safetensors does not match the vit3d encoder", result.message)
    assert "img_size=32" in result.message
    assert "another architecture or input size" in result.message


def _torch_load_calls(package: str) -> list[tuple[Path, int, bool]]:
    """``(file, line, weights_only=True given)`` of every ``torch.load`` call in a package."""
    calls = []
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                calls.append((path, node.lineno, safe))
    return calls


def test_every_torch_load_in_the_library_is_weights_only():
    calls = [c for pkg in LIBRARY for c in _torch_load_calls(pkg)]
    assert calls, "expected the resume loader's torch.load"
    unsafe = [f"{p.relative_to(REPO)}:{line}" for p, line, safe in calls if not safe]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_library_code_allows_pickle_in_numpy_files():
    hits = [
        f"{p.relative_to(REPO)}"
        for pkg in LIBRARY
        for p in sorted((REPO / pkg).rglob("*.py"))
        if re.search(r"allow_pickle\s*=\s*True", p.read_text(encoding="utf-8"))
    ]
    assert not hits, hits


def test_payload_pickles_by_reference(tmp_path: Path):
    """The payload needs no omnienc code to run: any process that unpickles it runs Path.touch."""
    import pickle

    marker = tmp_path / "m"
    data = pickle.dumps(PicklePayload(marker))
    assert b"omnienc" not in data and b"touch" in data
    pickle.loads(data)
    assert marker.exists()
