"""The ``omnienc`` command: the top-level parser, the dispatch, and one-line errors.

It only parses arguments; typed functions do the work. The list of subcommands (what ``omnienc
--help`` shows) is here; each subcommand group declares its own arguments in its module
(:mod:`~omnienc.cli.info`, :mod:`~omnienc.cli.features`, :mod:`~omnienc.cli.bench`,
:mod:`~omnienc.cli.pretext`, :mod:`~omnienc.cli.publish`, :mod:`~omnienc.cli.language`), the flags
they share once in :mod:`~omnienc.cli.common`.

Errors a user can fix (:class:`~omnienc.errors.OmniencError`) print one line naming the file and
the problem and exit with status 1; no library traceback reaches the user unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from omnienc import __version__
from omnienc.cli.bench import BENCH_JOBS, bench_arguments
from omnienc.cli.common import add_debug_flag
from omnienc.cli.features import embed_arguments, probe_arguments, umap_arguments
from omnienc.cli.info import info_arguments
from omnienc.cli.language import describe_arguments
from omnienc.cli.pretext import masks_arguments, segment_arguments
from omnienc.cli.publish import export_arguments
from omnienc.errors import OmniencError

logger = logging.getLogger("omnienc")


# Subcommands whose arguments a jsonargparse run config owns: name -> (module with main(argv),
# help line). argparse only lists them; main() hands them everything after their name.
RUN_CONFIG_COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("omnienc.pretext.train", "pretrain the shared encoder (Lightning)"),
    "align": (
        "omnienc.adapters.language.alignment",
        "train a projector from the frozen encoder into a causal LM (Lightning)",
    ),
}


def _add_run_config_command(sub: Any, name: str) -> None:
    """List a :data:`RUN_CONFIG_COMMANDS` subcommand; its arguments are parsed in main()."""
    p = sub.add_parser(
        name,
        help=RUN_CONFIG_COMMANDS[name][1],
        add_help=False,
        description=f"See `omnienc {name} --help`.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)  # handled in main() before argparse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``omnienc``."""
    parser = argparse.ArgumentParser(
        prog="omnienc",
        description="Self-supervised 3D representation learning for radiology.",
    )
    parser.add_argument("--version", action="version", version=f"omnienc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    add_debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="describe volumes: shape, spacing, orientation, modality",
        description="Print each volume's shape, spacing, orientation, modality "
        "and intensity range; a folder prints its manifest. Exits 1 if a file given "
        "is unreadable (files skipped inside a folder only warn).",
    )
    info_arguments(p)

    p = sub.add_parser(
        "embed",
        help="pooled features of volumes or MedMNIST splits -> .npz",
        description="Write frozen-encoder features (N, E), ids and labels to .npz. "
        "INPUT: a volume file, a folder, or medmnist:FLAG:SIZE:SPLIT.",
    )
    embed_arguments(p)

    p = sub.add_parser(
        "probe",
        help="linear probe of frozen features on a MedMNIST set",
        description="Extract frozen features of the train/val/test splits, fit a "
        "logistic regression (C chosen on val AUC) and report test ACC/AUC/F1 with "
        "bootstrap 95%% intervals, beside a random-init encoder of the same shape.",
    )
    probe_arguments(p)

    p = sub.add_parser(
        "bench",
        help="the benchmark suite: probes, baselines, label efficiency -> results tables",
        description="Run frozen probes (linear, kNN, attention head) of an encoder and of a "
        "random-init encoder of the same shape, supervised-from-scratch and fine-tuning "
        "baselines, at several fractions of the training labels; write JSON + Markdown.",
    )
    bench_arguments(p)

    _add_run_config_command(sub, "pretrain")

    p = sub.add_parser(
        "masks",
        help="class-agnostic mask proposals for a folder (cached)",
        description="Compute and cache mask proposals for every volume in DIR.",
    )
    masks_arguments(p)

    p = sub.add_parser(
        "export",
        help="a checkpoint as a folder to publish: safetensors, config.json, model card",
        description="Copy the checkpoint's weights and config.json into OUT (atomically) and "
        "write a model card README.md with Hugging Face metadata, the recipe, the pretraining "
        "data (from the run's config.yaml beside CKPT) and the numbers of --results files.",
    )
    export_arguments(p)

    p = sub.add_parser(
        "segment",
        help="few-shot in-context segmentation of a query volume",
        description="Segment in QUERY the structure that MASK marks in the support "
        "IMG, with the pretrained in-context head; output on the query's grid.",
    )
    segment_arguments(p)

    _add_run_config_command(sub, "align")

    p = sub.add_parser(
        "describe",
        help="generate text for a volume through an aligned projector and LM",
        description="Encode VOLUME with the frozen encoder CKPT, project it into the language "
        "model's input space and print the LM's greedy text. The projector defaults to the "
        "projector/ folder beside CKPT (as `omnienc align` writes it).",
    )
    describe_arguments(p)

    p = sub.add_parser(
        "umap",
        help="latent-space map of mixed inputs: PNG, interactive HTML, CSV + measured structure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed mixed inputs with a frozen encoder (and, by default, a random-init "
        "encoder of the same shape), map them to 2D with a seeded UMAP (cosine distance on "
        "centred features) and write, per encoder, OUT/TAG.png (coloured by modality, dataset, "
        "label and organ group), OUT/TAG.html (self-contained; hover shows the source file) and "
        "OUT/TAG.csv (2D coordinates with ids), plus OUT/metrics.json: silhouette per colouring "
        "(features and 2D), cross-validated kNN accuracy, and trustworthiness of the map.\n\n"
        "INPUT is one of:\n"
        "  a volume file or a folder of volumes (scanned recursively, DICOM by series)\n"
        "  medmnist:FLAG:SIZE:SPLIT       e.g. medmnist:adrenalmnist3d:28:test\n"
        "  structures:IMAGE:LABELS[:NAME] one crop (--crop-size) around each structure of the\n"
        "                                 label map LABELS (same grid as IMAGE) with at least\n"
        "                                 --min-voxels voxels; label = TotalSegmentator name\n"
        "                                 of its id, or NAME for every structure of a binary\n"
        "                                 mask, or 'label K' with NAME = ids (other label maps)\n"
        "  (paths in structures: specs may not contain ':')\n\n"
        "example:\n"
        "  omnienc umap checkpoints/omnienc-cpu30min ../shared/data/volumes \\\n"
        "    structures:../shared/data/volumes/totalsegmentator/example_ct_sm.nii.gz:"
        "../shared/data/volumes/totalsegmentator/example_seg.nii.gz \\\n"
        "    medmnist:adrenalmnist3d:28:test --max-per-input 200 -o runs/umap",
    )
    umap_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omnienc`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 2 if argv[:1] == ["--debug"] else 1
    if argv[lead - 1 : lead] and argv[lead - 1] in RUN_CONFIG_COMMANDS:
        # jsonargparse owns everything after `pretrain` / `align` (dotted overrides, --config).
        import importlib

        name = argv[lead - 1]
        logging.basicConfig(level=logging.INFO, format="omnienc: %(levelname)s: %(message)s")
        run = importlib.import_module(RUN_CONFIG_COMMANDS[name][0]).main
        rest = argv[lead:]
        return _report_errors(lambda: run(rest), lead == 2, f"omnienc {name}")
    if argv[lead - 1 : lead] == ["bench"] and argv[lead : lead + 1] and argv[lead] in BENCH_JOBS:
        # These jobs parse their own arguments, as `pretrain` does.
        import importlib

        job = importlib.import_module(BENCH_JOBS[argv[lead]][0])
        rest = argv[lead + 1 :]
        return _report_errors(lambda: int(job.main(rest)), lead == 2, f"omnienc bench {argv[lead]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for results files
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="omnienc: %(levelname)s: %(message)s",
    )
    return _report_errors(lambda: int(args.func(args)), args.debug)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(text: str) -> str:
    """``text`` with its lines joined and terminal escapes removed: an error is one line."""
    return " ".join(ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip())


def _report_errors(run: Callable[[], int], debug: bool, prog: str = "omnienc") -> int:
    """Run a command; print a user-fixable error in one line (no traceback unless ``debug``)."""
    try:
        return int(run())
    except OmniencError as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        if debug:
            raise
        print(
            f"{prog}: error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1
