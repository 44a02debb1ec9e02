"""The few-shot window a suite payload was scored with: recorded by the suite, read by summaries.

Few-shot cells depend on the reference crop and windows (192 mm at the encoder's spacing since
2026-12-07, each checkpoint's pretraining crop before). :func:`fewshot_window_record` is what a
suite payload stores, :func:`fewshot_window_of` reads it back as text, and
:func:`differing_windows` is what :mod:`omnienc.benchmarks.summary` warns about when encoders
scored with different windows are set side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fewshot_window_record(payload: dict[str, Any] | None) -> dict[str, Any]:
    """``{"fewshot_window", "fewshot_spacing"}`` of a few-shot payload, for the suite payload.

    The reference crop and window in voxels and their voxel size in mm (``None`` for a
    native-grid encoder, or for no payload).
    """
    if payload is None:
        return {"fewshot_window": None, "fewshot_spacing": None}
    settings = payload["settings"]
    return {
        "fewshot_window": list(settings["crop_size"]),
        "fewshot_spacing": settings.get("spacing"),
    }


def fewshot_window_of(payload: dict[str, Any]) -> str:
    """The few-shot reference crop and window a suite payload was scored with, as text.

    In mm when the payload records the voxel size (two encoders of different spacings that
    both look at 192 mm were scored alike), else in voxels. Payloads written before 2026-12-07
    record neither: they used each checkpoint's pretraining crop (32^3 voxels, 64 mm, for the
    CPU recipes); since then the default is 192 mm at the encoder's spacing.
    """
    window = payload.get("fewshot_window")
    if not window:
        return "not recorded (before 2026-12-07: the pretraining crop)"
    spacing = payload.get("fewshot_spacing")
    if spacing is None:
        return "x".join(str(int(v)) for v in window) + " voxels"
    return "x".join(f"{w * s:g}" for w, s in zip(window, spacing, strict=True)) + " mm"


def differing_windows(payloads: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct :func:`fewshot_window_of` texts of ``payloads``, sorted; ``[]`` if one."""
    windows = sorted({fewshot_window_of(p) for p in payloads})
    return windows if len(windows) > 1 else []
