"""A debugging hook for distributed runs: each rank's final weights, for cross-rank checks.

Set ``VQPRIOR_RANK_DUMP=<dir>`` and every rank of a training run writes, at the end of
training, its LightningModule's state dict (parameters and persistent buffers: the VQ-VAE's
codebook, the prior's EMA weights) to ``<dir>/rank{R}.safetensors``, and the weights it
started from (after DDP's initial broadcast) to ``<dir>/rank{R}.start.safetensors``. Under
DDP all ranks must hold identical tensors; the test suite checks this.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import safetensors.torch
from lightning.pytorch.callbacks import Callback

from vqprior.io import atomic_write_bytes

logger = logging.getLogger(__name__)

ENV_VAR = "VQPRIOR_RANK_DUMP"


class RankDump(Callback):
    """Write this rank's module state dict at train start and end into ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _dump(self, trainer: L.Trainer, pl_module: L.LightningModule, suffix: str) -> None:
        state = {
            k: v.detach().cpu().contiguous().clone() for k, v in pl_module.state_dict().items()
        }
        path = self.directory / f"rank{trainer.global_rank}{suffix}.safetensors"
        meta = {"global_step": str(trainer.global_step), "world_size": str(trainer.world_size)}
        atomic_write_bytes(path, safetensors.torch.save(state, metadata=meta))
        logger.info("rank %d wrote %s", trainer.global_rank, path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, ".start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "")


def rank_dump_callbacks() -> list[Callback]:
    """``[RankDump(dir)]`` when ``VQPRIOR_RANK_DUMP`` is set (and not empty), else ``[]``."""
    directory = os.environ.get(ENV_VAR, "").strip()
    return [RankDump(directory)] if directory else []
