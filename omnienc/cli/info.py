"""``omnienc info``: shape, spacing, orientation, modality and range of volumes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omnienc.cli.common import _fmt_tuple, add_common_flags, print_table
from omnienc.errors import OmniencError, PathError


def cmd_info(args: argparse.Namespace) -> int:
    """``omnienc info PATH...``: shape, spacing, orientation, modality and range per volume."""
    from omnienc.io import read_volume

    header = ["path", "kind", "shape", "spacing (mm)", "orient.", "modality", "range"]
    rows: list[list[str]] = []
    pairs: list[Any] = []
    failures = 0
    for spec in args.paths:
        path = Path(spec)
        if path.is_dir() and not args.series:
            from omnienc.data.folder import VolumeFolder  # MONAI: seconds to import, folders only

            folder = VolumeFolder(
                path,
                cache_dir=args.cache_dir,
                include_labels=True,
                frame=args.frame,
                progress=not args.quiet,
            )
            for e in folder.manifest:
                rows.append(
                    [
                        e.source + (f" [{e.series_uid}]" if e.series_uid else ""),
                        e.kind,
                        _fmt_tuple(e.shape),
                        _fmt_tuple(e.spacing),
                        "RAS",
                        f"{e.modality} ({e.modality_source})",
                        f"{e.intensity[0]:.4g}..{e.intensity[1]:.4g}",
                    ]
                )
            for source, problem in folder.skipped:
                rows.append([source, "skipped", "-", "-", "-", "-", problem.split(": ", 1)[-1]])
            from omnienc.data.pairing import pair_label_maps

            pairs.extend(pair_label_maps(folder))
            print(folder.summary(), file=sys.stderr)
            continue
        try:
            v = read_volume(path, frame=args.frame)
        except OmniencError as exc:
            if len(args.paths) == 1:
                raise
            rows.append(
                [
                    str(path),
                    "error",
                    "-",
                    "-",
                    "-",
                    "-",
                    exc.problem if isinstance(exc, PathError) else str(exc),
                ]
            )
            failures += 1
            continue
        rows.append(
            [
                str(path),
                "volume",
                _fmt_tuple(v.shape),
                _fmt_tuple(v.spacing),
                v.orientation,
                f"{v.modality} ({v.modality_source})",
                f"{float(v.array.min()):.4g}..{float(v.array.max()):.4g}",
            ]
        )
    print_table(header, rows)
    if pairs:
        print()
        print_table(
            ["image", "label map (same folder, same grid)"],
            [[p.image_id, str(p.label)] for p in pairs],
        )
    return 1 if failures else 0


def info_arguments(p: argparse.ArgumentParser) -> None:
    """``omnienc info``'s arguments, the common flags among them."""
    p.add_argument("paths", nargs="+", metavar="PATH", help="volume files, DICOM or other folders")
    p.add_argument("--frame", type=int, help="frame of 4D files to read")
    p.add_argument(
        "--series",
        action="store_true",
        help="read a folder as one DICOM series instead of scanning it",
    )
    add_common_flags(p, cache="preprocessing cache")
    p.set_defaults(func=cmd_info)
