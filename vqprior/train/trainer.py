"""The Lightning Trainer of a stage: strategy, loggers, callbacks, and the fit itself."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from vqprior.host import keep_freed_memory
from vqprior.train.callbacks import LastValidation, NonFiniteGuard, PlainProgress, TimeBudget
from vqprior.train.checkpoints import AtomicCheckpointIO, checkpoint_callbacks
from vqprior.train.config import DeviceOptions, TrainConfig
from vqprior.train.rankdump import rank_dump_callbacks
from vqprior.train.resume import ResumeState
from vqprior.train.rundir import CKPT_DIR, LAST_CKPT, flatten_metrics


def progress_enabled(device: DeviceOptions) -> bool:
    return device.progress if device.progress is not None else sys.stderr.isatty()


def _device_count(device: DeviceOptions) -> int:
    """How many devices per node ``device`` asks for, counted as Lightning counts them."""
    spec = device.trainer_devices()
    if isinstance(spec, int) and spec >= 0:
        return spec
    if isinstance(spec, str) and spec.strip() != "auto":
        return len([d for d in spec.split(",") if d.strip()])
    if device.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return (os.cpu_count() or 1) if spec == -1 else 1


def resolve_strategy(device: DeviceOptions | str) -> Any:
    """Lightning strategy for ``device``: the same DDP settings for ``--strategy ddp`` and for
    ``auto`` on several devices or nodes (where Lightning would pick plain DDP itself).

    DDP runs without buffer broadcast: every rank already holds identical codebooks (the
    quantizer all-reduces its EMA statistics and broadcasts restarts), and broadcasting would
    overwrite each rank's local code-usage counts, which are all-reduced when read.
    """
    if isinstance(device, str):  # a strategy name alone: devices and nodes unknown
        device = DeviceOptions(strategy=device)
    name = device.strategy
    several = _device_count(device) * device.num_nodes > 1
    if name == "ddp" or (name == "auto" and several):
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE
        from lightning.pytorch.strategies import DDPStrategy

        # in a notebook Lightning's auto choice is ddp_fork: keep that start method there
        fork = name == "auto" and _IS_INTERACTIVE
        return DDPStrategy(broadcast_buffers=False, start_method="fork" if fork else "popen")
    return name


def loggers(out: Path) -> list[Any]:
    """CSV logs under ``out/logs`` (flattened into ``metrics.csv``), plus TensorBoard under
    ``out/tensorboard`` when the ``tensorboard`` package is installed."""
    found: list[Any] = [CSVLogger(save_dir=out / "logs", name="")]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        found.append(
            TensorBoardLogger(save_dir=out / "tensorboard", name="", default_hp_metric=False)
        )
    return found


def val_interval(train: TrainConfig) -> int:
    """Steps between validations: ``train.val_every_n_steps``, but at least ~10 per run so
    that a loss plot shows a curve."""
    return max(1, min(train.val_every_n_steps, train.steps // 10))


def build_trainer(
    out: Path,
    train: TrainConfig,
    device: DeviceOptions,
    callbacks: Sequence[Callback],
    has_val: bool,
    started: float | None = None,
) -> L.Trainer:
    """A Trainer writing checkpoints, CSV logs and the non-finite guard's output under ``out``;
    with ``train.max_time_s``, a :class:`TimeBudget` counting from ``started`` (``time.time()``)."""
    bar = progress_enabled(device)
    budget = [TimeBudget(train, started)] if train.max_time_s else []
    deadline = budget[0].started + train.max_time_s if budget else None
    return L.Trainer(
        default_root_dir=out,
        max_steps=train.steps,
        max_epochs=-1,
        accelerator=device.accelerator,
        devices=device.trainer_devices(),
        num_nodes=device.num_nodes,
        strategy=resolve_strategy(device),
        precision=device.resolved_precision(),  # type: ignore[arg-type]
        logger=loggers(out),
        callbacks=[
            ResumeState(),
            LastValidation(),
            NonFiniteGuard(out),
            *([] if bar else [PlainProgress(train.batch_size, deadline=deadline)]),
            *budget,
            *callbacks,
            *rank_dump_callbacks(),
            *checkpoint_callbacks(out, train, has_val),  # last: they see every other state
        ],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the DataModule shards (and orders) the data itself
        gradient_clip_val=train.grad_clip or None,
        val_check_interval=val_interval(train) if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=(train.val_batches or 1.0) if has_val else 0,
        log_every_n_steps=train.log_every_n_steps,
        num_sanity_val_steps=0,
        enable_progress_bar=bar,
        enable_model_summary=False,
    )


def run_training(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    ckpt: Path | None,
    out: Path,
    has_val: bool,
) -> dict[str, float]:
    """Fit (resuming from ``ckpt``; freed host memory kept for reuse), save a final
    ``last.ckpt``, validate the final weights (unless fit just did), flatten the CSV logs into
    ``metrics.csv``; return the final scalar metrics.

    ``ckpt`` is passed explicitly rather than as Lightning's ``ckpt_path="last"``: rank zero
    has already checked the run dir (prepare_run_dir) and every rank resumes from that file.
    """
    keep_freed_memory()
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True
        )
        trainer.save_checkpoint(out / CKPT_DIR / LAST_CKPT, weights_only=False)
        metrics = scalar_metrics(trainer.callback_metrics)
        last = next(c for c in trainer.callbacks if isinstance(c, LastValidation))  # type: ignore[attr-defined]
        if has_val and last.step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update(scalar_metrics(trainer.callback_metrics))
    finally:
        if trainer.is_global_zero:
            flatten_metrics(out)
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Plain floats from Lightning's callback metrics (finite or not)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, (int, float)):
            out[k] = float(v)
    return out
