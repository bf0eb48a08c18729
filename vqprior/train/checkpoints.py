"""Checkpoints of a run: atomic writes, periodic + last (to resume), best validation (to export).

``checkpoints/`` holds ``last.ckpt`` (full training state, what a rerun resumes from), the
newest ``train.keep_checkpoints`` periodic ``step=*.ckpt`` files and, when the run has a
validation split, ``best.ckpt``: the weights with the lowest ``val/loss`` so far (what the
stage exports when they beat the final weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from vqprior.io import atomic_torch_save, safe_torch_load
from vqprior.train.config import TrainConfig
from vqprior.train.rundir import BEST_CKPT, CKPT_DIR

VAL_METRIC = "val/loss"  # what the best checkpoint minimises


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced and renamed; loaded with weights_only=True.

    A failed write (a full disk) leaves the previous checkpoint of that name in place and
    raises one OSError line naming the file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        return safe_torch_load(path, map_location="cpu")


class PruneCheckpoints(Callback):
    """Keep only the newest ``keep`` periodic ``step=*.ckpt`` files (``last.ckpt`` and
    ``best.ckpt`` are never pruned)."""

    def __init__(self, ckpt_dir: str | Path, keep: int) -> None:
        self.ckpt_dir, self.keep = Path(ckpt_dir), keep

    @rank_zero_only
    def prune(self) -> None:
        files = sorted(self.ckpt_dir.glob("step=*.ckpt"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.prune()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prune()


def checkpoint_callbacks(out: Path, train: TrainConfig, has_val: bool) -> list[Callback]:
    """Periodic ``step=*.ckpt`` + ``last.ckpt``, and ``best.ckpt`` (lowest ``val/loss``)."""
    periodic = ModelCheckpoint(
        dirpath=out / CKPT_DIR,
        filename="step={step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=train.ckpt_every_n_steps,
        save_last=True,
        save_top_k=-1,  # PruneCheckpoints keeps the newest train.keep_checkpoints
        enable_version_counter=False,
    )
    found: list[Callback] = [PruneCheckpoints(out / CKPT_DIR, train.keep_checkpoints), periodic]
    if has_val:
        found.append(
            ModelCheckpoint(
                dirpath=out / CKPT_DIR,
                filename=Path(BEST_CKPT).stem,
                monitor=VAL_METRIC,
                mode="min",
                save_top_k=1,
                save_last=False,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    return found


def best_checkpoint(trainer: L.Trainer) -> tuple[Path, float] | None:
    """The best-validation checkpoint of this fit and its ``val/loss`` (None without one)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor == VAL_METRIC and cb.best_model_path:
            path = Path(cb.best_model_path)
            if path.is_file() and cb.best_model_score is not None:
                return path, float(cb.best_model_score)
    return None
