"""What the BraTS crop-classification benchmark draws and trains: its full and quick budgets.

:class:`BratsBudget` is the one place the full and quick modes of
:mod:`omnienc.benchmarks.brats_classify` differ; :data:`BUDGET_OPTIONS` are its command-line
overrides, read and written by :func:`budget_from_options` and :func:`budget_options`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omnienc.benchmarks.brats_loco import ScratchBudget


@dataclass(frozen=True)
class BratsBudget:
    """What the benchmark draws and trains (the full and quick modes differ only here).

    Attributes:
        per_class: Crops of each class per case.
        min_distance: Smallest distance between two centres of one class, in voxels of a 2 mm
            grid (scaled to the encoder's grid, so that it is the same distance in mm).
        min_brain_fraction: Smallest share of brain in a crop.
        floor_seeds: Seeds of the random-init encoders of the floor.
        scratch_seeds: Seeds of the supervised-from-scratch runs.
        scratch: The from-scratch training budget.
        n_boot: Bootstrap replicates of every interval.
    """

    per_class: int = 24
    min_distance: float = 6.0
    min_brain_fraction: float = 0.5
    floor_seeds: tuple[int, ...] = (0, 1, 2)
    scratch_seeds: tuple[int, ...] = (0, 1, 2)
    scratch: ScratchBudget = field(default_factory=ScratchBudget)
    n_boot: int = 1000


FULL_BUDGET = BratsBudget()
QUICK_BUDGET = BratsBudget(
    per_class=12,
    min_distance=8.0,
    floor_seeds=(0,),
    scratch_seeds=(0,),
    scratch=ScratchBudget(steps=20),
    n_boot=500,
)


# Budget options of the command line: name -> (type, what it sets).
BUDGET_OPTIONS: dict[str, tuple[type, str]] = {
    "per_class": (int, "crops per class per case"),
    "min_distance": (float, "voxels between two centres of a class"),
    "min_brain_fraction": (float, "least brain share of a crop"),
    "floor_seeds": (int, "random-init floor encoders (seeds 0..N-1)"),
    "scratch_seeds": (int, "from-scratch runs (seeds 0..N-1)"),
    "scratch_steps": (int, "from-scratch steps per fold"),
    "scratch_batch": (int, "from-scratch crops per step"),
    "n_boot": (int, "bootstrap replicates"),
}


def budget_options(budget: BratsBudget) -> dict[str, float]:
    """A budget as the values of :data:`BUDGET_OPTIONS` (seed tuples as their lengths)."""
    return {
        "per_class": budget.per_class,
        "min_distance": budget.min_distance,
        "min_brain_fraction": budget.min_brain_fraction,
        "floor_seeds": len(budget.floor_seeds),
        "scratch_seeds": len(budget.scratch_seeds),
        "scratch_steps": budget.scratch.steps,
        "scratch_batch": budget.scratch.batch_size,
        "n_boot": budget.n_boot,
    }


def budget_from_options(base: BratsBudget, options: dict[str, Any]) -> BratsBudget:
    """``base`` with the given :data:`BUDGET_OPTIONS` values (``None`` keeps base's)."""
    given = {k: v for k, v in options.items() if k in BUDGET_OPTIONS and v is not None}
    scratch = dataclasses.replace(
        base.scratch,
        steps=given.pop("scratch_steps", base.scratch.steps),
        batch_size=given.pop("scratch_batch", base.scratch.batch_size),
    )
    for k in ("floor_seeds", "scratch_seeds"):
        if k in given:
            given[k] = tuple(range(given[k]))
    return dataclasses.replace(base, scratch=scratch, **given)
