"""Pretraining throughput: the full Lightning step vs a plain PyTorch loop on the same batches.

    python -m omnienc.benchmarks.pretrain_throughput --crop 64 --batch-size 4 --steps 20

Crops/s counts both crops of every pair. The plain loop runs the same module's
``forward_pair`` + backward + AdamW on batches fetched (and augmented) beforehand, so the
difference is the data pipeline (sampling, augmentation, collation) plus Lightning's own
bookkeeping. On a GPU the views are computed there, after the transfer (``data.augment_on:
auto``), so the Lightning step counts them and the plain loop does not.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from omnienc.benchmarks.machine import load_average
from omnienc.pretext.data import DataConfig, PretrainDataModule
from omnienc.pretext.module import ModelConfig, PretrainModule
from omnienc.pretext.pairs import PairConfig


class StepTimer(Callback):
    """Wall time of the training steps after ``warmup`` (data loading included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def measure(
    encoder: str,
    crop: int,
    batch_size: int,
    steps: int,
    warmup: int,
    workers: int,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> dict[str, Any]:
    """Lightning and plain-loop timings of ``steps`` steps after ``warmup``.

    On ``accelerator="gpu"`` the plain loop moves the pre-fetched batches to the GPU first and
    runs under bf16 autocast when ``precision`` is ``"bf16-mixed"``, as Lightning does.
    """
    data_cfg = DataConfig(
        batch_size=batch_size,
        steps_per_epoch=steps + warmup,
        num_workers=workers,
        pair=PairConfig(crop_size=(crop, crop, crop)),
    )
    dm = PretrainDataModule(data_cfg)
    dm.prepare_data()
    dm.setup()
    model_cfg = ModelConfig(encoder=encoder)
    torch.manual_seed(0)
    module = PretrainModule(model_cfg, data_cfg.pair.crop_size)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[timer],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    assert timer.start is not None and timer.end is not None
    lightning_s = timer.end - timer.start

    # The same batches, fetched and augmented first (on the GPU: after the transfer, as in
    # training), through a plain loop.
    dm.set_step(0)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    batches = [
        dm.on_after_batch_transfer({k: v.to(device) for k, v in b.items()}, 0)
        for b in list(dm.train_dataloader())[warmup:]
    ]
    torch.manual_seed(0)
    plain = PretrainModule(model_cfg, data_cfg.pair.crop_size).to(device).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=model_cfg.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step(batch: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = plain.forward_pair(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up of the plain loop
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    plain_s = time.perf_counter() - start
    crops = 2 * batch_size * steps
    return {
        "encoder": encoder,
        "crop": crop,
        "batch_size": batch_size,
        "steps": steps,
        "num_workers": workers,
        "accelerator": accelerator,
        "precision": precision,
        "lightning_s": round(lightning_s, 2),
        "plain_s": round(plain_s, 2),
        "lightning_crops_per_s": round(crops / lightning_s, 2),
        "plain_crops_per_s": round(crops / plain_s, 2),
        "overhead": round(lightning_s / plain_s - 1, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark; writes JSON and Markdown."""
    import sys

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="resconv_small")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_throughput"))
    args = p.parse_args(argv)
    rows = [
        measure(
            args.encoder,
            args.crop,
            args.batch_size,
            args.steps,
            args.warmup,
            w,
            accelerator=args.accelerator,
            precision=args.precision,
        )
        for w in args.workers
    ]
    command = "python -m omnienc.benchmarks.pretrain_throughput " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    where = (
        f"{torch.cuda.get_device_name()} ({args.precision})" if args.accelerator == "gpu" else "CPU"
    )
    lines = [
        f"# Pretraining throughput on {where}",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; 1-minute load average at the end: "
        f"{load_average():.2f}",
        "",
        "| encoder | crop | batch | workers | Lightning crops/s | plain loop crops/s | "
        "overhead | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['crop']}^3 | {r['batch_size']} | {r['num_workers']} | "
            f"{r['lightning_crops_per_s']} | {r['plain_crops_per_s']} | "
            f"{100 * r['overhead']:.1f}% | {r['peak_rss_mb']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
