"""Untrusted checkpoint and cache files: pickle payloads, tampered folders, other architectures.

Each attack writes a file a user could be handed (a ``.pt`` from a forum, a checkpoint folder
from a colleague, a shared cache) into a scratch folder and hands it to one loader: the Python
API (``load_encoder``, ``VolumeFolder``, ...) or the command line (``omnienc embed``, ``probe``,
``segment``, ``pretrain``). A pickle payload is an object whose ``__reduce__`` creates a marker
file when unpickled (:class:`PicklePayload`); an attack is *refused* when the loader raises its
documented omnienc error (or, for a cache entry, rebuilds it with a warning), and the payload
*ran* when the marker exists afterwards. The tests (``tests/robustness/``) and the benchmark
(``python -m omnienc.benchmarks.robustness``) share these attacks.

The payloads are in :mod:`~omnienc.benchmarks.robustness.payloads`, the attacks in
:mod:`~omnienc.benchmarks.robustness.attacks`, the mismatches in
:mod:`~omnienc.benchmarks.robustness.mismatches`; :func:`run_checkpoint_attacks` runs them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnienc.benchmarks.robustness.attacks import ATTACKS, AttackContext, run_attack
from omnienc.benchmarks.robustness.mismatches import MISMATCHES, run_mismatch
from omnienc.benchmarks.robustness.payloads import payload_is_live


def run_checkpoint_attacks(work: Path, checkpoint: Path, volumes: Path) -> list[dict[str, Any]]:
    """Every attack of :data:`ATTACKS` and :data:`MISMATCHES`, as table rows.

    Args:
        work: Scratch folder.
        checkpoint: A genuine exported encoder with an in-context head.
        volumes: ``<data root>/volumes``.

    Returns:
        Rows ``{"attack", "entry", "refused", "executed", "message"}``.

    Raises:
        RuntimeError: The pickle payload does not run when unpickled unsafely (the check
            would prove nothing).
    """
    work.mkdir(parents=True, exist_ok=True)
    if not payload_is_live(work):
        raise RuntimeError(
            "the pickle payload does not create its marker: the attacks prove nothing"
        )
    ctx = AttackContext(work, checkpoint, volumes)
    rows = [vars(run_attack(name, ctx)) for name in ATTACKS]
    rows += [vars(run_mismatch(name, ctx)) for name in MISMATCHES]
    return rows
