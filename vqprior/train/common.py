"""Shared training machinery: run dirs, atomic checkpoints, the trainer, optimizers, metrics."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vqprior.config import ConfigError
from vqprior.io import atomic_path, atomic_torch_save, atomic_write_text, safe_torch_load
from vqprior.ranks import is_rank_zero
from vqprior.train.callbacks import NonFiniteGuard, PruneCheckpoints
from vqprior.train.config import DeviceOptions, TrainConfig
from vqprior.train.rankdump import rank_dump_callbacks
from vqprior.train.resume import ResumeState, remove_stale_temps

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
MODEL_DIR = "model"
IMAGES_DIR = "images"
# what a run dir may hold besides config.yaml (a cache of codes may be put there beforehand)
RUN_ENTRIES = frozenset(
    {
        CKPT_DIR,
        MODEL_DIR,
        IMAGES_DIR,
        "codes",
        "logs",
        "tensorboard",
        "metrics.csv",
        "summary.json",
        "vae.json",
    }
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced and renamed; loaded with weights_only=True."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        return safe_torch_load(path, map_location="cpu")


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any]:
    """The first dotted key at which two nested dicts differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                return _first_difference(
                    old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}."
                )
    return prefix.rstrip("."), old, new


def check_run_dir(out: Path, resolved: dict[str, Any]) -> None:
    """Refuse (one line) an ``out`` that is a file, holds a different run's config, or holds
    other files than a run's and no ``config.yaml`` (not a run dir). Writes nothing."""
    resolved = yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False))
    cfg_file = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a directory for the run")
    if cfg_file.is_file():
        old = _read_run_config(cfg_file)
        if old != resolved:
            key, a, b = _first_difference(old, resolved)
            raise ConfigError(
                f"{out} holds a different run ({key} is {a!r} there, {b!r} now): "
                f"use another --out, or delete {out} to start over"
            )
    elif out.is_dir():
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and p.name[0] != "."
        )
        if foreign:
            raise ConfigError(
                f"--out {out} is not empty ({', '.join(foreign[:3])}) and is not a vqprior run "
                "(no config.yaml): use a new or empty directory"
            )


def prepare_run_dir(out: Path, resolved: dict[str, Any]) -> Path | None:
    """Write ``config.yaml`` (or check it equals ``resolved``); return a checkpoint to resume.

    Refuses what :func:`check_run_dir` refuses. Temp files that a killed run left behind are
    removed. Call it holding the run's :class:`vqprior.lock.RunLock`.
    """
    last = out / CKPT_DIR / LAST_CKPT
    if not is_rank_zero():
        # a DDP child re-runs the command while rank 0 is already training: it must neither
        # write nor clean up (it could delete rank 0's checkpoint temp file mid-write)
        return last if last.is_file() else None
    check_run_dir(out, resolved)
    cfg_file = out / "config.yaml"
    if not cfg_file.is_file():
        out.mkdir(parents=True, exist_ok=True)
        plain = yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_text(cfg_file, yaml.safe_dump(plain, sort_keys=False))
    remove_stale_temps(out, out / CKPT_DIR, out / "codes", out / MODEL_DIR)
    if last.is_file():
        logger.info("resuming from %s", last)
        return last
    return None


def _read_run_config(cfg_file: Path) -> Any:
    try:
        return yaml.safe_load(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot read {cfg_file} ({reason}): fix it, or use another --out"
        ) from None


def lr_lambda(train: TrainConfig) -> Any:
    """Multiplier of the base lr at a step: linear warmup, then constant or cosine to zero."""

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class StageModule(L.LightningModule):
    """Routes Lightning's train/val/test steps to one ``_step(batch, stage)`` (STYLE.md)."""

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")


def configure_adamw(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> dict[str, Any]:
    """AdamW plus a per-step LambdaLR schedule, in Lightning's configure_optimizers format."""
    trainable = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def progress_enabled(device: DeviceOptions) -> bool:
    return device.progress if device.progress is not None else sys.stderr.isatty()


def resolve_strategy(name: str) -> Any:
    """Lightning strategy for ``name``; plain DDP does not broadcast buffers.

    Every rank already holds identical codebooks (the quantizer all-reduces its EMA statistics
    and broadcasts restarts), and broadcasting would overwrite each rank's local code-usage
    counts, which are all-reduced at the end of an epoch instead.
    """
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(broadcast_buffers=False)
    return name


def loggers(out: Path) -> list[Any]:
    """CSV logs under ``out/logs`` (flattened into ``metrics.csv``), plus TensorBoard under
    ``out/tensorboard`` when the ``tensorboard`` package is installed."""
    import importlib.util

    found: list[Any] = [CSVLogger(save_dir=out / "logs", name="")]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        found.append(
            TensorBoardLogger(save_dir=out / "tensorboard", name="", default_hp_metric=False)
        )
    return found


def build_trainer(
    out: Path,
    train: TrainConfig,
    device: DeviceOptions,
    callbacks: Sequence[Callback],
    has_val: bool,
) -> L.Trainer:
    """A Trainer writing checkpoints, CSV logs and the non-finite guard's output under ``out``."""
    ckpt = ModelCheckpoint(
        dirpath=out / CKPT_DIR,
        filename="step={step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=train.ckpt_every_n_steps,
        save_last=True,
        save_top_k=-1,  # PruneCheckpoints keeps the newest train.keep_checkpoints
        enable_version_counter=False,
    )
    return L.Trainer(
        default_root_dir=out,
        max_steps=train.max_steps,
        max_epochs=-1,
        accelerator=device.accelerator,
        devices=device.trainer_devices(),
        num_nodes=device.num_nodes,
        strategy=resolve_strategy(device.strategy),
        precision=device.resolved_precision(),  # type: ignore[arg-type]
        logger=loggers(out),
        callbacks=[
            ResumeState(),
            NonFiniteGuard(out),
            PruneCheckpoints(out / CKPT_DIR, train.keep_checkpoints),
            *callbacks,
            *rank_dump_callbacks(),
            ckpt,
        ],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the DataModule shards (and orders) the data itself
        gradient_clip_val=train.grad_clip or None,
        val_check_interval=train.val_every_n_steps if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=(train.val_batches or 1.0) if has_val else 0,
        log_every_n_steps=train.log_every_n_steps,
        num_sanity_val_steps=0,
        enable_progress_bar=progress_enabled(device),
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
    """Fit (resuming from ``ckpt``), save a final ``last.ckpt``, validate once more, flatten the
    CSV logs into ``metrics.csv``; return the final scalar metrics."""
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True
        )
        trainer.save_checkpoint(out / CKPT_DIR / LAST_CKPT, weights_only=False)
        metrics = scalar_metrics(trainer.callback_metrics)
        if has_val:
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update(scalar_metrics(trainer.callback_metrics))
    finally:
        if trainer.is_global_zero:
            flatten_metrics(out)
    return metrics


def flatten_metrics(out: Path) -> Path | None:
    """Merge every ``logs/version_*/metrics.csv`` into one ``metrics.csv``: a row per step.

    Later launches (resumes) win for a step they share with earlier ones.
    """
    files = sorted(
        (out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not files:
        return None
    rows: dict[int, dict[str, str]] = {}
    columns: list[str] = ["step"]
    for f in files:
        fresh: dict[int, dict[str, str]] = {}
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = int(float(row.get("step") or 0))
                values = {k: v for k, v in row.items() if k and v not in ("", None)}
                fresh.setdefault(step, {}).update(values)
                columns += [k for k in values if k not in columns]
        for step, values in fresh.items():
            rows[step] = values if step not in rows else {**rows[step], **values}
    target = out / "metrics.csv"
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({**rows[step], "step": step})
    return target


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Plain floats from Lightning's callback metrics (finite or not)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def find_export(path: str | Path, what: str) -> Path:
    """An exported model dir: ``path`` itself or ``path/model`` (a run dir)."""
    p = Path(path)
    if (p / MODEL_DIR / "config.json").is_file():
        return p / MODEL_DIR
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(
        f"no exported {what} at {p}: pass a run dir (holding model/) or an exported model dir"
    )
