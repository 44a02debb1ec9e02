"""What one few-shot benchmark run is: its methods, settings and encoders.

:func:`build_roles` turns an encoder spec into the encoders the methods use: for a checkpoint,
its encoder and in-context head (``pretrained``) and a random-init encoder and head of the same
shape (``random``, the floor); for ``random:ARCH[:SEED]``, that encoder alone, with no head.
Every encoder method uses one reference crop and window size: the one asked for, else
:func:`omnienc.pretext.segment.default_window` (192 mm at the encoder's spacing, as
``omnienc segment``). Before 2026-12-07 it was the pretraining crop (32^3, 64 mm, for the CPU
recipes): the results of that time record ``settings.crop_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnienc.adapters.classification import checkpoint_id, random_checkpoint_id
from omnienc.benchmarks.fewshot_methods import EncoderMethods
from omnienc.benchmarks.registration import RegistrationConfig
from omnienc.checkpoint import file_sha256, load_checkpoint_config, load_encoder
from omnienc.config import positive_int_triple
from omnienc.encoders import arch_name, parse_random_spec, random_encoder, random_like
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import build_incontext_head
from omnienc.pretext.segment import HEAD_NAME, default_window, load_incontext_head

METHODS = (
    "head",
    "head_random",
    "prototype",
    "prototype_random",
    "intensity",
    "registration",
    "head_atlas",
    "prototype_atlas",
)
"""Every method, in table order."""
ATLAS_OF = {"head_atlas": "head", "prototype_atlas": "prototype"}
"""The atlas-localised diagnostics and the method whose mask each restricts to the atlas region."""
ROLE_OF = {
    "head": "pretrained",
    "prototype": "pretrained",
    "head_random": "random",
    "prototype_random": "random",
    "head_atlas": "pretrained",
    "prototype_atlas": "pretrained",
}
"""Which encoder an encoder-based method uses."""
DEFAULT_MIN_VOXELS = 400  # just under the smaller pyradiomics lesion (brain2: 453 voxels)
DEFAULT_OVERLAP = 0.25
"""Sliding-window overlap of the encoder methods: MONAI's default (``omnienc segment`` uses 0.5).
It sweeps 2.6 times fewer windows (75 instead of 196 on a BraTS scan): the full benchmark took
287 s instead of 412 s on two busy cores, and the shipped checkpoint's head scored 0.001-0.021
lower per cross-scan group than at 0.5 (the prototype matcher within 0.03)."""


@dataclass(frozen=True)
class Settings:
    """The settings of a run (recorded in the payload).

    Attributes:
        shots: Supports per query.
        quick: Whether the fixed ``--quick`` subset runs.
        min_voxels: Native voxels a structure needs in every scan of a query (a half in the
            intra-scan rows needs half of it).
        crop_size: Reference crop and window of the encoder methods.
        overlap: Sliding-window overlap.
        registration: Registration settings.
        threshold: Probability threshold of the head (as ``segment_fewshot``).
        intensity_k: Half-width of the intensity window in standard deviations.
        batch_size: Windows per encoder call.
        atlas_margin_mm: The atlas region of ``head_atlas`` and ``prototype_atlas``: voxels
            within this many mm of the registration's warped support mask.
    """

    shots: int
    quick: bool
    min_voxels: int
    crop_size: tuple[int, int, int]
    overlap: float
    registration: RegistrationConfig
    threshold: float = 0.5
    intensity_k: float = 1.5
    batch_size: int = 4
    atlas_margin_mm: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        d = dataclasses.asdict(self)
        d["crop_size"] = list(self.crop_size)
        d["registration"] = self.registration.to_dict()
        return d


@dataclass
class Roles:
    """The encoders of a run and what identifies them.

    Attributes:
        encoders: ``{"pretrained": ..., "random": ...}`` (only ``random`` for a random spec).
        preprocessing: The encoder's preprocessing.
        crop_size: The reference crop and window size of the encoder methods.
        info: ``{"source", "checkpoint", "arch"}`` of the encoder under test.
        floor: ``random:ARCH:SEED`` of the floor (``None`` for a random spec).
        checkpoint_files: File name -> sha256 of the checkpoint folder's files.
        unavailable: Method -> why it cannot run with this encoder.
    """

    encoders: dict[str, EncoderMethods]
    preprocessing: Preprocessing
    crop_size: tuple[int, int, int]
    info: dict[str, str]
    floor: str | None
    checkpoint_files: dict[str, str]
    unavailable: dict[str, str]


def build_roles(
    spec: str, seed: int, overlap: float = 0.5, crop_size: Sequence[int] | None = None
) -> Roles:
    """The encoders of a run for an encoder spec.

    Args:
        spec: A checkpoint folder or ``random:ARCH[:SEED]``.
        seed: Seed of the floor (and of a random spec without one).
        overlap: Sliding-window overlap.
        crop_size: Reference crop and window size ``(S_x, S_y, S_z)`` (default:
            :func:`~omnienc.pretext.segment.default_window` of the encoder).

    Raises:
        CheckpointError: The folder is not a loadable checkpoint, or its head does not fit.
        ValueError: Unknown architecture, or a crop size that is not three positive ints.
    """
    asked = None if crop_size is None else positive_int_triple("crop_size", crop_size)
    parsed = parse_random_spec(spec)
    if parsed is not None:
        arch, spec_seed = parsed
        s = seed if spec_seed is None else spec_seed
        encoder = random_encoder(arch, s).eval()
        window = asked or default_window(encoder, Preprocessing())
        cid = random_checkpoint_id(arch, s)
        why = f"{spec} is a random-init encoder with no in-context head"
        return Roles(
            {"random": EncoderMethods(encoder, None, window, overlap)},
            Preprocessing(),
            window,
            {"source": spec, "checkpoint": cid, "arch": arch},
            None,
            {},
            {
                "head": why,
                "head_random": why,
                "head_atlas": why,
                "prototype": f"{spec} is itself random-init: see prototype_random",
                "prototype_atlas": f"{spec} is itself random-init: see prototype_random",
            },
        )
    path = Path(spec)
    encoder, pre = load_encoder(path)
    config = load_checkpoint_config(path)
    meta = config.get("meta") or {}
    crop = asked or default_window(encoder, pre, meta.get("crop_size"))
    head, floor_head = None, None
    unavailable = {}
    if HEAD_NAME in (config.get("extra") or {}):
        head, meta = load_incontext_head(path, encoder)
    else:
        why = f"{path} holds no in-context head"
        unavailable = {"head": why, "head_random": why, "head_atlas": why}
    floor = random_like(encoder, seed).eval()  # seeds torch, so the floor head is seeded too
    if head is not None:
        floor_head = build_incontext_head(floor.feature_info, meta[HEAD_NAME]).eval()
    arch = arch_name(encoder)
    return Roles(
        {
            "pretrained": EncoderMethods(encoder, head, crop, overlap),
            "random": EncoderMethods(floor, floor_head, crop, overlap),
        },
        pre,
        crop,
        {"source": str(spec), "checkpoint": checkpoint_id(path), "arch": arch},
        random_checkpoint_id(arch, seed),
        {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.is_file()},
        unavailable,
    )


def method_descriptions(methods: list[str], settings: Settings) -> dict[str, str]:
    """One sentence per method that ran, for the results."""
    text = {
        "head": "the checkpoint's encoder + in-context head, run as segment_fewshot runs it "
        "(reference crop centred on the support mask, sliding windows, probability > "
        f"{settings.threshold}); k supports average their probability maps",
        "head_random": "a random-init encoder and in-context head of the same shape (the floor)",
        "prototype": "frozen-feature prototype matching with the checkpoint's encoder (no head): "
        "masked average pooling of the support crop's features at every scale, cosine similarity "
        "of the query's windows, upsampled and averaged over scales; threshold maximising Dice of "
        "the support's own similarity map (intra-scan: on the support half, from the whole scan's "
        "windows); k supports average their prototypes and thresholds",
        "prototype_random": "the same with the random-init encoder",
        "intensity": f"support mean +- {settings.intensity_k:g} SD of the preprocessed intensity, "
        "largest connected component of the query (k supports pool their voxels)",
        "registration": "SimpleITK atlas registration of the support onto the query, label map "
        "warped by nearest neighbour; k atlases by majority vote (at least half); not run on the "
        "diagnostic rows (a scan registered onto itself is the identity, which the tests check; "
        "two halves of a scan hold different anatomy, nothing to register)",
        "head_atlas": "the head's mask kept only within "
        f"{settings.atlas_margin_mm:g} mm of the registration's warped support mask: how well "
        "the head delineates once registration gives the location (a diagnostic; cross-scan "
        "rows only)",
        "prototype_atlas": "the prototype matcher's mask restricted the same way",
    }
    return {m: text[m] for m in methods}
