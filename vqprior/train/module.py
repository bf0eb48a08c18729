"""What the stage LightningModules share: step routing and the AdamW + LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch

from vqprior.nn.layout import trains_channels_last
from vqprior.nn.precision import full_precision
from vqprior.train.config import TrainConfig


def lr_lambda(train: TrainConfig) -> Any:
    """Multiplier of the base lr at a step: linear warmup, then constant or cosine to zero.

    A function of (step, the step bound ``train.steps``) only: an extended run (a rerun with a
    larger ``max_steps``) recomputes the schedule for the new ``max_steps``, so a cosine run goes on
    from where the new, longer curve stands at the resumed step (the lr jumps up to it).
    """

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class StageModule(L.LightningModule):
    """Routes Lightning's train/val/test steps to one ``_step(batch, stage)`` (STYLE.md).

    Validation and test run with autocast off, so the figures they log are the fp32 ones
    whatever the training precision. Training uses channels-last memory where it pays
    (:func:`~vqprior.nn.layout.trains_channels_last`; ``is_prior`` says which stage this is).
    """

    use_channels_last: bool = False
    is_prior: bool = False
    max_val_batches: int | None = None  # validate on the first batches only (a time budget's cap)

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        self.use_channels_last = trains_channels_last(self.device.type, precision, self.is_prior)
        if self.use_channels_last:  # the trained model and its EMA copy
            self.to(memory_format=torch.channels_last)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """Float images ``[b, c, H, W]`` in channels-last when the model is; else unchanged."""
        if self.use_channels_last and x.dim() == 4 and x.is_floating_point():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.max_val_batches is not None and batch_idx >= self.max_val_batches:
            return None  # past the cap (vqprior.train.callbacks.TimeBudget): not evaluated
        with full_precision(self.device.type):
            return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with full_precision(self.device.type):
            return self._step(batch, "test")


def configure_adamw(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> dict[str, Any]:
    """AdamW plus a per-step LambdaLR schedule, in Lightning's configure_optimizers format.

    LambdaLR does not store the lambda in its state dict, so a resumed run uses the lambda of
    its own (possibly extended) config.
    """
    trainable = [p for p in params if p.requires_grad]
    betas = (0.9, train.adam_beta2)
    opt = torch.optim.AdamW(trainable, lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
