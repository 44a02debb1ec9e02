"""Masks for a folder of volumes, cached: the driver behind ``omnienc masks``.

:func:`compute_folder_masks` proposes masks for every volume of a
:class:`~omnienc.data.folder.VolumeFolder` (in worker processes when asked), reusing cached
entries and rebuilding a damaged one with a warning; :func:`format_mask_summary` is the
command's closing report.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from omnienc.data.folder import VolumeFolder
from omnienc.errors import DataError
from omnienc.pretext.masks.cache import MaskResult, load_masks, mask_cache_path, save_masks
from omnienc.pretext.masks.config import MaskConfig
from omnienc.pretext.masks.providers import propose_masks

logger = logging.getLogger("omnienc")


def _read_image(cache_file: str) -> np.ndarray:
    """The preprocessed ``(X, Y, Z)`` image of a :class:`VolumeFolder` cache entry."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            image = z["image"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(cache_file, f"cannot read the preprocessed volume ({exc})") from None
    return image[0]


def _masks_for_volume(
    source: str, image_file: str, out: str, config_dict: dict[str, Any]
) -> MaskResult:
    """Serve one volume's proposals from the cache, or compute and cache them."""
    start = time.perf_counter()
    config = MaskConfig.from_dict(config_dict)
    path = Path(out)
    image = _read_image(image_file)
    if path.exists():
        try:
            masks = load_masks(path)
            if masks.shape[1:] != image.shape:
                raise DataError(path, f"mask grid {masks.shape[1:]} differs from {image.shape}")
            return MaskResult(source, len(masks), time.perf_counter() - start, out, True)
        except DataError as exc:
            logger.warning("corrupt mask cache entry %s (%s); regenerating it", path, exc.problem)
    masks = propose_masks(image, config)
    save_masks(path, masks, config, source)
    return MaskResult(source, len(masks), time.perf_counter() - start, out, False)


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def compute_folder_masks(
    folder: VolumeFolder,
    config: MaskConfig,
    cache_dir: str | Path,
    workers: int = 1,
    progress: bool = True,
) -> list[MaskResult]:
    """Proposals for every volume of ``folder``, computed once and cached under ``cache_dir``.

    Each volume's preprocessed image is read from its folder cache entry; proposals already in
    the cache are only checked (a damaged entry is rebuilt with a warning). Writes are atomic,
    so concurrent runs on the same cache never leave a half-written file.

    Args:
        folder: The volumes (``folder.entries``).
        config: Proposal parameters.
        cache_dir: Folder of the mask cache (created if missing).
        workers: Processes working in parallel (``ProcessPoolExecutor`` when > 1; each gets an
            equal share of the CPUs for SimpleITK).
        progress: Show a progress bar.

    Returns:
        One :class:`MaskResult` per entry, in the order of ``folder.entries``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (e.source, e.cache_file, str(mask_cache_path(e, config, cache_dir)), config.to_dict())
        for e in folder.entries
    ]
    bar = tqdm(total=len(jobs), desc="mask proposals", unit="vol", disable=not progress)
    results: list[MaskResult | None] = [None] * len(jobs)
    try:
        if workers == 1:
            for i, job in enumerate(jobs):
                results[i] = _masks_for_volume(*job)
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(threads,)) as ex:
                futures = {ex.submit(_masks_for_volume, *job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        bar.close()
    return [r for r in results if r is not None]


def format_mask_summary(results: Sequence[MaskResult]) -> str:
    """A plain-text table of :func:`compute_folder_masks` results, with totals and means.

    Returns:
        One row per volume (volume, masks, seconds, cached) and a summary line.
    """
    if not results:
        return "no volumes"
    names = [r.source for r in results]
    width = max(len("volume"), *(len(n) for n in names))
    lines = [f"{'volume':<{width}}  {'masks':>5}  {'seconds':>7}  cached"]
    for r in results:
        lines.append(
            f"{r.source:<{width}}  {r.n_masks:>5}  {r.seconds:>7.2f}  {'yes' if r.cached else 'no'}"
        )
    n = len(results)
    total = sum(r.n_masks for r in results)
    computed = [r.seconds for r in results if not r.cached]
    line = f"{n} volumes, {total} masks ({total / n:.1f} per volume)"
    if computed:
        line += (
            f"; computed {len(computed)} in {sum(computed):.1f} s "
            f"({sum(computed) / len(computed):.2f} s per volume)"
        )
    if n - len(computed):
        line += f"; {n - len(computed)} from cache"
    lines.append(line)
    return "\n".join(lines)
