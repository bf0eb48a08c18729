"""One pixel prior trained for a wall-clock budget by the training stage's own loop.

The module is :class:`~vqprior.train.prior.PriorModule` (AdamW and the lr schedule from
``configure_optimizers``, the warm-up EMA, the stage's loss); a Lightning Trainer fits it with
gradient clipping and the arm's precision (``bf16-mixed`` autocasts with the likelihood in
fp32 and channels-last weights), and the stage's ``train.max_time_s`` clock
(:class:`~vqprior.train.callbacks.TimeBudget`, which fits a cosine schedule to the budget)
stops it when the budget is spent. The data and the held-out figure: :func:`load_split` and
:func:`held_out_bits`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence, Sized
from typing import Any, NamedTuple, cast

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from vqprior.data import DataConfig, load_image_splits
from vqprior.models.pixelcnn import PixelCNN
from vqprior.train.callbacks import TimeBudget
from vqprior.train.config import UNBOUNDED
from vqprior.train.prior import PriorModule

LN2 = math.log(2.0)


class Split(NamedTuple):
    """Training and held-out images (float, [-1, 1], ``[n, c, H, W]``) and labels (long ``[n]``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor


def load_split(data: str, held_out: int, limit: int | None) -> Split:
    """The training and held-out sets; the held-out images are the last ones (mnist: its test)."""
    kind, _, path = data.partition(":")
    if kind == "digits":  # the embedded 8x8 digits (tests, smoke runs)
        cfg = DataConfig(name="digits", val_fraction=0.0, test_fraction=0.0)
    elif kind == "npz":
        cfg = DataConfig(name="npz", path=path, val_fraction=0.0, test_fraction=0.0)
    elif kind == "mnist":
        cfg = DataConfig(name="mnist", root=path, download=False, val_fraction=0.0)
    else:
        raise ValueError(f"--data must be digits, npz:PATH or mnist:ROOT, got {data!r}")
    splits = load_image_splits(cfg)

    def stack(items: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [items[i] for i in range(n)]
        return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])

    x, y = stack(splits.train, len(cast(Sized, splits.train)))
    if kind == "mnist":  # the official test split is the held-out set
        held = stack(splits.test, min(held_out, len(cast(Sized, splits.test))))
    else:
        held, x, y = (x[-held_out:], y[-held_out:]), x[:-held_out], y[:-held_out]
    return Split(x[:limit], y[:limit], *held) if limit else Split(x, y, *held)


def prior_module(shape: Sequence[int], model: dict[str, Any], train: dict[str, Any]) -> PriorModule:
    """A pixel prior for images of ``shape`` (c, H, W) with an arm's model and train fields."""
    c, h, w = (int(n) for n in shape)
    spec = {"in_channels": c, "height": h, "width": w, **model}
    return PriorModule(spec, {"max_steps": UNBOUNDED, **train})


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Endless-in-effect random batches ``(x, y)``, drawn with replacement (seeded)."""
    data = TensorDataset(x, y)
    draws = RandomSampler(
        data,
        replacement=True,
        num_samples=max(len(data), batch_size),
        generator=torch.Generator().manual_seed(seed),
    )
    return DataLoader(
        data, sampler=BatchSampler(draws, batch_size, drop_last=True), batch_size=None
    )


class Trained(NamedTuple):
    steps: int
    elapsed: float  # seconds from the trainer's construction to the end of the fit
    horizon: int | None  # a cosine schedule's step count fitted to the budget


def fit_for(
    module: PriorModule, split: Split, seconds: float, precision: str, seed: int
) -> Trained:
    """Train ``module`` on ``split.train_x/train_y`` for ``seconds`` (the training stage's
    :class:`~vqprior.train.callbacks.TimeBudget`, cosine horizon included)."""
    if seconds <= 0:
        return Trained(0, 0.0, None)
    clock = TimeBudget(dataclasses.replace(module.train_cfg, max_time_s=seconds))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_epochs=-1,
        max_steps=-1,
        callbacks=[clock],
        gradient_clip_val=module.train_cfg.grad_clip or None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = batches(split.train_x, split.train_y, module.train_cfg.batch_size, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
        trainer.fit(module, train_dataloaders=loader)
    return Trained(trainer.global_step, clock.elapsed(), clock.horizon)


@torch.no_grad()
def held_out_bits(model: PixelCNN, x: torch.Tensor, y: torch.Tensor, chunk: int = 100) -> float:
    """Bits per dimension of ``model`` (float32, eval mode) on ``x`` (labels ``y`` if it is
    class-conditional)."""
    model = model.float().eval()
    conditional = bool(model.config.num_classes)
    nats = torch.cat(
        [
            model.log_prob(x[i : i + chunk], y[i : i + chunk] if conditional else None)
            for i in range(0, len(x), chunk)
        ]
    )
    return (-nats.mean() / model.num_dims / LN2).item()
