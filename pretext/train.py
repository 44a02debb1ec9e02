"""``omnienc pretrain``: typed config -> Lightning Trainer -> exported encoder.

``pretrain(config) -> Path`` does the work; :func:`main` only parses a YAML config merged with
command-line overrides (jsonargparse, as LightningCLI does: ``--trainer.max_steps 100``,
``--data.pair.crop_size [32,32,32]``). Unknown keys are errors, and the resolved config is saved
as ``RUN_DIR/config.yaml``.

The run folder holds ``checkpoints/last.ckpt`` (Lightning state for resuming, written atomically
at every epoch end; an epoch is ``data.steps_per_epoch`` steps), ``encoder/`` (the exported
encoder and in-context head, refreshed with every checkpoint), ``config.yaml`` and the CSV and
TensorBoard logs. Running the same command again resumes from ``last.ckpt``; a run killed with
SIGKILL loses at most the epoch in progress, never a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from omnienc.atomic import atomic_target, remove_stale_temps
from omnienc.checkpoint import save_encoder, state_mismatch
from omnienc.checkpoint_folder import recover_interrupted_save
from omnienc.config import trainer_config_parser
from omnienc.errors import CheckpointError, OmniencError
from omnienc.pretext.data import DataConfig, PretrainDataModule
from omnienc.pretext.module import ModelConfig, PretrainModule

logger = logging.getLogger("omnienc")

RESUME_MODES = ("auto", "never", "always")

# omnienc's defaults for Trainer arguments the config does not set: epochs are only checkpoint
# boundaries (a run ends by max_steps or max_time), and no validation loop.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": -1,
    "log_every_n_steps": 5,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
    # The data module splits the step-keyed sample stream across ranks itself.
    "use_distributed_sampler": False,
}


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs.

    Attributes:
        model: Encoder, heads, losses, optimiser.
        data: Data sources, preprocessing, masks, pairs, batch size.
        trainer: Keyword arguments of ``pytorch_lightning.Trainer`` (max_steps, max_time,
            devices, strategy, precision, ...).
        run_dir: Output folder.
        data_root: Data root for relative ``data.roots`` (default: ``$OMNIENC_DATA`` or
            ``../shared/data``).
        seed: Seeds weights and the sample stream.
        resume: ``auto`` resumes from ``run_dir/checkpoints/last.ckpt`` when it exists;
            ``never`` refuses a run folder that has checkpoints; ``always`` requires one.
        checkpoint_every_n_epochs: Epochs between checkpoints (and encoder exports).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs/pretrain"
    data_root: str | None = None
    seed: int = 0
    resume: str = "auto"
    checkpoint_every_n_epochs: int = 1


# Test-only fault injection; never set it outside tests. It makes the interrupted-run tests
# (tests/robustness/test_interrupts.py, omnienc.benchmarks.robustness.interrupts) deterministic:
#   stop_at_step=N   the process stops itself (SIGSTOP) once optimiser step N is done, so that
#                    the test can SIGKILL it from outside at a known point mid-epoch;
#   kill_in_save=N   the process SIGKILLs itself during its Nth checkpoint write, after the
#                    temporary file is complete and before it is renamed to last.ckpt.
FAULT_ENV = "OMNIENC_TEST_FAULT"
FAULT_KINDS = ("stop_at_step", "kill_in_save")


def injected_fault(kind: str) -> int | None:
    """The ``N`` of ``$OMNIENC_TEST_FAULT=KIND=N`` when it names ``kind``, else ``None``.

    Raises:
        ValueError: The variable is set but is not ``KIND=N`` with a known kind and ``N >= 1``.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    name, _, value = spec.partition("=")
    if name not in FAULT_KINDS or not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{FAULT_ENV}={spec!r} is not one of {', '.join(k + '=N' for k in FAULT_KINDS)} "
            "(N >= 1); it is for tests only: unset it"
        )
    return int(value) if name == kind else None


class StopAtStep(Callback):
    """Test-only: stop the process with SIGSTOP after optimiser step ``step`` (see FAULT_ENV)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGSTOP)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed; loaded weights-only.

    A kill during a write leaves the previous ``last.ckpt`` untouched (and a hidden temporary
    that the next write, or the next run's start, removes). Loading uses
    ``torch.load(weights_only=True)``, so a checkpoint cannot run code.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saves = 0
        self._kill_in_save = injected_fault("kill_in_save")

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self._saves += 1
        with atomic_target(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
            if self._saves == self._kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "no such checkpoint file")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                path,
                f"not a loadable training checkpoint ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); only weights-only checkpoints "
                "are accepted (pickled objects are refused, never run)",
            ) from exc


class PeriodicCheckpoint(Callback):
    """Write ``last.ckpt`` every ``every_n_epochs`` epochs and when training ends.

    Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` writes ``last.ckpt`` only when
    training ends (its epoch-end save of ``last`` follows a top-k save), which would lose a killed
    run; this callback saves through the trainer (so through :class:`AtomicCheckpointIO`, and
    with every callback's ``on_save_checkpoint``, hence the encoder export) on every rank, as
    ``trainer.save_checkpoint`` requires.

    Args:
        path: The checkpoint file, ``RUN_DIR/checkpoints/last.ckpt``.
        every_n_epochs: Epochs between saves, >= 1.
    """

    def __init__(self, path: Path, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"checkpoint_every_n_epochs must be >= 1, got {every_n_epochs}")
        self.path = path
        self.every_n_epochs = every_n_epochs
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state, for resuming
        self._saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(trainer)


class ExportEncoder(Callback):
    """Export the encoder + in-context head with every checkpoint and at the end of training."""

    def __init__(self, folder: Path, preprocessing: Any) -> None:
        self.folder = folder
        self.preprocessing = preprocessing
        self._exported_step = -1

    def _export(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(module, PretrainModule):
            return
        if trainer.global_step == self._exported_step:
            return
        save_encoder(
            module.encoder,
            self.folder,
            self.preprocessing,
            meta=module.export_meta(),
            extra=module.heads(),
        )
        self._exported_step = trainer.global_step

    def on_save_checkpoint(
        self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._export(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._export(trainer, module)


def _resume_path(config: PretrainConfig, ckpt_dir: Path) -> Path | None:
    last = ckpt_dir / "last.ckpt"
    if config.resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {config.resume!r}")
    if config.resume == "never" and last.exists():
        raise CheckpointError(
            last,
            "the run folder already has a checkpoint and resume=never; choose another "
            "run_dir (nothing was overwritten)",
        )
    if config.resume == "always" and not last.exists():
        raise CheckpointError(last, "resume=always but there is no checkpoint to resume from")
    return last if last.exists() and config.resume != "never" else None


def check_resumable(ckpt_path: Path, module: pl.LightningModule) -> None:
    """Refuse to resume from a checkpoint written by a different model.

    Lightning would fail deep inside ``load_state_dict`` with every mismatched tensor; this
    names the checkpoint and the first differences, and says how to go on.

    Raises:
        CheckpointError: The checkpoint is unreadable or its weights do not fit ``module``.
    """
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(ckpt_path, "has no model state_dict; it is not a training checkpoint")
    problems = state_mismatch(module.state_dict(), state)
    if problems:
        raise CheckpointError(
            ckpt_path,
            "was written by a different model than this config builds ("
            + "; ".join(problems[:4])
            + (f"; {len(problems) - 4} more" if len(problems) > 4 else "")
            + "); resume with the run's own config, or choose another run_dir",
        )


def _is_first_process() -> bool:
    """Whether this is rank 0 of node 0 (the process that tidies and writes run files).

    Reads the variables the launchers set before Lightning starts: ``RANK`` (torchrun),
    ``SLURM_PROCID`` (srun), ``LOCAL_RANK`` and ``NODE_RANK`` (Lightning's own launcher).
    """
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(int(os.environ.get(k) or "0") == 0 for k in ranks)


def clean_interrupted_run(run_dir: Path) -> list[Path]:
    """Tidy what a killed run left in ``run_dir`` before a new run (or a resume) starts.

    Removes the hidden temporaries of a ``last.ckpt`` write whose process is gone, and repairs an
    encoder export killed between its renames
    (:func:`omnienc.checkpoint_folder.recover_interrupted_save`).
    The complete ``last.ckpt`` is never touched.

    Returns:
        The temporaries removed.
    """
    removed = remove_stale_temps(run_dir / "checkpoints" / "last.ckpt")
    for path in removed:
        logger.warning("removed %s, left by an interrupted checkpoint write", path)
    recover_interrupted_save(run_dir / "encoder")
    return removed


def build_trainer(config: PretrainConfig, run_dir: Path) -> pl.Trainer:
    """The Lightning Trainer of a run: checkpoints, export, logs, and the user's overrides."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    kwargs: dict[str, Any] = {**TRAINER_DEFAULTS, **config.trainer}
    if kwargs.get("max_steps", -1) in (None, -1) and not kwargs.get("max_time"):
        raise ValueError("set trainer.max_steps or trainer.max_time: a run needs an end")
    callbacks: list[Callback] = [
        PeriodicCheckpoint(run_dir / "checkpoints" / "last.ckpt", config.checkpoint_every_n_epochs),
        ExportEncoder(run_dir / "encoder", config.data.preprocessing),
    ]
    stop_at = injected_fault("stop_at_step")
    if stop_at is not None:
        callbacks.append(StopAtStep(stop_at))
    loggers = [
        CSVLogger(run_dir, name="logs"),  # version_N per invocation: a resume never overwrites
        TensorBoardLogger(run_dir, name="tensorboard", default_hp_metric=False),
    ]
    return pl.Trainer(
        default_root_dir=run_dir,
        enable_checkpointing=False,  # PeriodicCheckpoint writes last.ckpt
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def pretrain(config: PretrainConfig) -> Path:
    """Pretrain an encoder and export it.

    Args:
        config: The run's :class:`PretrainConfig`.

    Returns:
        The exported encoder folder (``run_dir/encoder``), loadable with
        :func:`omnienc.load_encoder`.
    """
    run_dir = Path(config.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_first_process():
        clean_interrupted_run(run_dir)
    ckpt_path = _resume_path(config, run_dir / "checkpoints")
    if ckpt_path is not None:
        logger.warning("resuming from %s", ckpt_path)
    pl.seed_everything(config.seed, workers=True)
    datamodule = PretrainDataModule(config.data, data_root=config.data_root, seed=config.seed)
    module = PretrainModule(config.model, config.data.pair.crop_size, seed=config.seed)
    if ckpt_path is not None:
        check_resumable(ckpt_path, module)
    trainer = build_trainer(config, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return run_dir / "encoder"


def build_parser() -> Any:
    """jsonargparse parser of ``omnienc pretrain`` (config file + dotted overrides)."""
    return trainer_config_parser(
        "omnienc pretrain",
        "Pretrain the shared encoder by mask-guided in-context segmentation and a "
        "contrastive objective. Values come from --config YAML files, then dotted overrides "
        "such as --trainer.max_steps 100 or --data.batch_size 8. Unknown keys are errors.",
        PretrainConfig,
        TRAINER_DEFAULTS,
    )


def parse_config(argv: list[str]) -> tuple[PretrainConfig, Any, Any]:
    """Parse ``argv`` into a :class:`PretrainConfig` (and the raw namespace for saving)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    init = parser.instantiate_classes(namespace)
    fields = {k: v for k, v in vars(init).items() if k in PretrainConfig.__dataclass_fields__}
    fields["trainer"] = namespace.trainer.as_dict()
    return PretrainConfig(**fields), parser, namespace


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``omnienc pretrain``; returns the exit status."""
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, parser, namespace = parse_config(argv)
    except (ArgumentError, ValueError, TypeError) as exc:
        print(f"omnienc pretrain: error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(config.run_dir).expanduser()
    if _is_first_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        namespace.pop("config", None)
        with atomic_target(run_dir / "config.yaml") as tmp:
            tmp.write_text(parser.dump(namespace, skip_none=False))
    try:
        encoder_dir = pretrain(config)
    except OmniencError as exc:
        print(f"omnienc pretrain: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported encoder: {encoder_dir}")
    return 0
