"""The robustness harness: bad inputs, bad checkpoints, interrupts and memory.

``python -m omnienc.benchmarks.robustness`` (:mod:`~omnienc.benchmarks.robustness.harness`)
runs it all and writes ``benchmarks/results/robustness.{md,json}``.

* :mod:`~omnienc.benchmarks.robustness.badinputs`: bad inputs made from real files
  (:mod:`~omnienc.benchmarks.robustness.cases` says what each entry point must do with them;
  the generators are :mod:`~omnienc.benchmarks.robustness.bad_files`,
  :mod:`~omnienc.benchmarks.robustness.bad_volumes`,
  :mod:`~omnienc.benchmarks.robustness.bad_folders`);
* :mod:`~omnienc.benchmarks.robustness.observation`: one case through one entry point, judged;
  :mod:`~omnienc.benchmarks.robustness.privileges` runs the permission cases without root's
  override;
* :mod:`~omnienc.benchmarks.robustness.badcheckpoints`: untrusted checkpoint and cache files
  (:mod:`~omnienc.benchmarks.robustness.payloads`,
  :mod:`~omnienc.benchmarks.robustness.attacks`,
  :mod:`~omnienc.benchmarks.robustness.mismatches`);
* :mod:`~omnienc.benchmarks.robustness.interrupts`: pretraining killed and resumed;
* :mod:`~omnienc.benchmarks.robustness.memory`: peak memory of ``omnienc embed`` and ``segment``
  on large inputs (:mod:`~omnienc.benchmarks.robustness.memory_inputs`);
* :mod:`~omnienc.benchmarks.robustness.tables`: the results as Markdown.

The names below are the harness's API; each module holds more. They are imported on first use
(PEP 562), so that ``python -m omnienc.benchmarks.robustness.memory`` (or ``.interrupts``) does
not import its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module of the harness's public names
_MODULE_OF = {
    "ATTACKS": "attacks",
    "AttackContext": "attacks",
    "AttackResult": "attacks",
    "BadInput": "cases",
    "ENTRY_POINTS": "cases",
    "Expect": "cases",
    "ISSUE_KINDS": "badinputs",
    "MISMATCHES": "mismatches",
    "Observation": "observation",
    "PicklePayload": "payloads",
    "RunContext": "observation",
    "Verdict": "observation",
    "base_rss_mb": "memory",
    "bound_mb": "memory",
    "build_context": "harness",
    "case_plan": "badinputs",
    "format_markdown": "tables",
    "judge": "observation",
    "leftovers": "interrupts",
    "main": "harness",
    "make_bad_inputs": "badinputs",
    "measure_peaks": "memory",
    "observe": "observation",
    "omnienc_command": "interrupts",
    "payload_is_live": "payloads",
    "peak_rss": "memory",
    "restore_permissions": "badinputs",
    "run_attack": "attacks",
    "run_checkpoint_attacks": "badcheckpoints",
    "run_cli": "observation",
    "run_kill_scenarios": "interrupts",
    "run_matrix": "harness",
    "run_mismatch": "mismatches",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """A public name of the harness, imported from its module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
