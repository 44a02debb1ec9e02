"""CPU throughput and memory of every registered encoder, with MONAI's ResNet-10 as a reference.

For each architecture and cube size it measures, in a fresh subprocess (so that the peak RSS,
``getrusage(RUSAGE_SELF).ru_maxrss``, belongs to that one configuration):

* parameters;
* inference: ``model.eval()`` under ``torch.inference_mode()``, volumes per second;
* training: forward + backward + ``AdamW.step()`` on a synthetic loss (mean square of the
  output: the pooled embedding for omnienc encoders, the logits for ResNet-10), volumes per second;
* peak RSS after the inference phase and after the training phase (inference runs first, so the
  first number is not inflated by training). Both include the Python interpreter, torch and the
  imports (about the ``baseline`` column, measured after building the model).

Each phase runs ``--warmup`` untimed iterations, then timed iterations until ``--seconds`` have
passed and at least ``--min-iters`` ran; volumes per second are ``B / median step time``, which
bursts of load from other processes on a shared machine barely move (the total-time rate and
min/median/max step times are kept too, and so is the share of CPU that other processes used
during each phase, read from /proc/stat). Inputs are ``randn`` volumes ``(B, 1, S, S, S)``.

Run::

    python -m omnienc.benchmarks.encoders                  # everything -> benchmarks/results/
    python -m omnienc.benchmarks.encoders --sizes 32 --archs resconv_tiny vit3d_tiny
    python -m omnienc.benchmarks.encoders --one resconv_tiny 32     # one config, JSON on stdout
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnienc.benchmarks.machine import cpu_model, cpu_seconds
from omnienc.encoders import ENCODERS, build_encoder

REFERENCE = "monai_resnet10"
RESULTS = Path(__file__).resolve().parent / "results"


def build_model(arch: str) -> nn.Module:
    """A registered omnienc encoder, or MONAI's 3D ResNet-10 (one channel in, two logits out)."""
    if arch == REFERENCE:
        from monai.networks.nets import resnet10

        return resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)
    return build_encoder(arch)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(
    step: Callable[[], None], batch: int, warmup: int, seconds: float, min_iters: int
) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times, then time it for ``seconds`` (at least ``min_iters`` runs).

    Returns:
        Volumes per second from the median step time (robust to bursts of load from other
        processes) and from the total time, step-time statistics, and the share of the machine's
        CPU that other processes used meanwhile.
    """
    for _ in range(warmup):
        step()
    times: list[float] = []
    busy0, own0 = cpu_seconds()
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    busy1, own1 = cpu_seconds()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1))
    return {
        "volumes_per_s": batch / statistics.median(times),
        "volumes_per_s_total": batch * len(times) / sum(times),
        "iters": len(times),
        "step_ms_min": 1000 * min(times),
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_max": 1000 * max(times),
        "other_cpu_pct": 100 * other,
    }


def measure(
    arch: str, size: int, batch: int, seconds: float, warmup: int, min_iters: int
) -> dict[str, Any]:
    """Measure one architecture at one cube size in this process.

    Returns:
        A JSON-serialisable dict of the measurements (see the module docstring).
    """
    torch.manual_seed(0)
    model = build_model(arch)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 1, size, size, size)
    baseline = _peak_rss_mb()

    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    inference = _timed(infer, batch, warmup, seconds, min_iters)
    rss_infer = _peak_rss_mb()

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()

    training = _timed(train, batch, warmup, seconds, min_iters)
    return {
        "arch": arch,
        "size": size,
        "batch": batch,
        "params": params,
        "train": training,
        "infer": inference,
        "baseline_rss_mb": baseline,
        "peak_rss_infer_mb": rss_infer,
        "peak_rss_train_mb": _peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def run_isolated(arch: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter and return its JSON (or the error).

    A run during which other processes used more than ``args.max_other_cpu`` percent of the
    machine's CPU is repeated up to ``args.retries`` times; the least disturbed run is kept.
    """
    cmd = [sys.executable, "-m", "omnienc.benchmarks.encoders", "--one", arch, str(size)]
    cmd += ["--batch", str(args.batch), "--seconds", str(args.seconds)]
    cmd += ["--warmup", str(args.warmup), "--min-iters", str(args.min_iters)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    best: dict[str, Any] | None = None
    for attempt in range(1, args.retries + 2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            return {"arch": arch, "size": size, "error": f"exit {proc.returncode}: {tail[0]}"}
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["attempt"] = attempt
        if best is None or _disturbance(result) < _disturbance(best):
            best = result
        if _disturbance(best) <= args.max_other_cpu:
            break
    assert best is not None
    best["attempts"] = attempt
    return best


def _disturbance(result: dict[str, Any]) -> float:
    """The larger share of CPU (%) other processes used during the two phases of a run."""
    return max(result["train"]["other_cpu_pct"], result["infer"]["other_cpu_pct"])


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on."""
    import monai
    import timm

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page: table, command, date and machine."""
    m = report["machine"]
    lines = [
        "# Encoder throughput on CPU",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, "
        f"torch threads {m['torch_threads']}; Python {m['python']}, torch {m['torch']}, "
        f"MONAI {m['monai']}, timm {m['timm']}; {m['platform']}",
        "",
        f"Batch {report['batch']}; random `(B, 1, S, S, S)` volumes; {report['warmup']} warm-up "
        f"iterations, then timed ones for {report['seconds_per_phase']} s (at least "
        f"{report['min_iters']}). *train* = forward + backward + AdamW step on the mean square of "
        "the output; *infer* = eval mode under `torch.inference_mode()`. Volumes/s come from the "
        "median step time (the JSON also has the total-time rate and min/median/max step times). "
        "Peak RSS is per configuration (fresh process) and includes the interpreter and imports "
        "(*baseline*: after building the model). *other CPU* is the share of the machine's CPU "
        "that other processes used during the train / infer phase: where it is high, the "
        "numbers are less reliable. A configuration disturbed by more than "
        f"{report['max_other_cpu_pct']:.0f}% was measured again (up to {report['retries']} "
        "more times) and the least disturbed attempt kept.",
        "",
        "| arch | params (M) | S | train vol/s | infer vol/s | train step ms (min/med/max) "
        "| peak RSS train (MB) | peak RSS infer (MB) | baseline RSS (MB) "
        "| iters train/infer | other CPU % train/infer | attempts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | | {r['size']} | failed: {r['error']} | | | | | | | | |")
            continue
        t, i = r["train"], r["infer"]
        lines.append(
            f"| {r['arch']} | {r['params'] / 1e6:.2f} | {r['size']} "
            f"| {t['volumes_per_s']:.2f} | {i['volumes_per_s']:.2f} "
            f"| {t['step_ms_min']:.0f}/{t['step_ms_median']:.0f}/{t['step_ms_max']:.0f} "
            f"| {r['peak_rss_train_mb']:.0f} | {r['peak_rss_infer_mb']:.0f} "
            f"| {r['baseline_rss_mb']:.0f} | {t['iters']}/{i['iters']} "
            f"| {t['other_cpu_pct']:.0f}/{i['other_cpu_pct']:.0f} | {r['attempts']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m omnienc.benchmarks.encoders", description=__doc__)
    p.add_argument("--archs", nargs="+", default=[*ENCODERS, REFERENCE])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per phase")
    p.add_argument("--min-iters", type=int, default=5, help="timed iterations at least")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=20.0,
        help="repeat a configuration if other processes used more than this %% of the CPU",
    )
    p.add_argument("--retries", type=int, default=1, help="repeats of a disturbed configuration")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--one", nargs=2, metavar=("ARCH", "SIZE"), help="measure one, print JSON")
    args = p.parse_args(argv)
    unknown = set(args.archs) - {*ENCODERS, REFERENCE}
    if unknown:
        p.error(f"unknown archs {sorted(unknown)}; known: {[*ENCODERS, REFERENCE]}")
    if args.one and args.one[0] not in {*ENCODERS, REFERENCE}:
        p.error(f"unknown arch {args.one[0]!r}; known: {[*ENCODERS, REFERENCE]}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (``--one``) or run every configuration and write the results files."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        arch, size = args.one[0], int(args.one[1])
        result = measure(arch, size, args.batch, args.seconds, args.warmup, args.min_iters)
        print(json.dumps(result))
        return 0

    command = shlex.join(["python", "-m", "omnienc.benchmarks.encoders", *sys.argv[1:]])
    results = []
    for arch in args.archs:
        for size in args.sizes:
            r = run_isolated(arch, size, args)
            results.append(r)
            print(json.dumps(r), flush=True)
    report = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads or torch.get_num_threads()),
        "batch": args.batch,
        "seconds_per_phase": args.seconds,
        "warmup": args.warmup,
        "min_iters": args.min_iters,
        "max_other_cpu_pct": args.max_other_cpu,
        "retries": args.retries,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "encoders.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "encoders.md").write_text(to_markdown(report))
    print(f"wrote {args.out_dir / 'encoders.json'} and {args.out_dir / 'encoders.md'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
