"""Training callbacks: the non-finite loss guard, periodic image grids, plain progress lines."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection

from vqprior.artifacts import save_image_grid
from vqprior.io import atomic_torch_save
from vqprior.train.config import UNBOUNDED
from vqprior.train.errors import NonFiniteLossError
from vqprior.train.module import lr_lambda

logger = logging.getLogger(__name__)

NONFINITE_BATCH = "nonfinite_batch.pt"


class NonFiniteGuard(Callback):
    """Stop at the first non-finite loss, before its backward pass and optimizer step.

    The offending batch goes to ``<out>/nonfinite_batch.pt`` (atomically); the checkpoints
    already written are left as they are. Under DDP every rank stops together.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad_here = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        step = trainer.global_step
        where = self.out_dir / NONFINITE_BATCH
        if trainer.global_rank:
            where = where.with_name(f"nonfinite_batch.rank{trainer.global_rank}.pt")
        if bad_here:
            batch = apply_to_collection(self._batch, torch.Tensor, lambda t: t.detach().cpu())
            atomic_torch_save({"step": step, "loss": float(loss.detach()), "batch": batch}, where)
        last = self.out_dir / "checkpoints" / "last.ckpt"
        kept = (
            f"the last good checkpoint is {last}"
            if last.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss.detach())}) at step {step}; training stopped, {kept}; "
            f"the batch is saved in {where}: lower train.lr or set train.grad_clip"
        )


class ImageGrids(Callback):
    """Every ``every_n_steps`` (and at the end of training) write ``make()``'s grid as a PNG.

    ``make(pl_module)`` returns images [b, c, H, W] in [-1, 1] and the images per row; it
    runs with the module in eval mode and under ``torch.random.fork_rng`` of the CPU RNG (the
    samplers draw their noise on the CPU from a seeded generator, never on the device).

    A grid is a diagnostic: when it fails (any exception), one warning line is logged and
    training goes on, so a grid never costs a run its checkpoint or its export.
    """

    def __init__(
        self,
        image_dir: str | Path,
        prefix: str,
        make: Callable[[L.LightningModule], tuple[torch.Tensor, int]],
        every_n_steps: int,
    ) -> None:
        self.image_dir, self.prefix, self.make, self.every = (
            Path(image_dir),
            prefix,
            make,
            every_n_steps,
        )
        self._last_step = -1

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        path = self.image_dir / f"{self.prefix}_step{step:07d}.png"
        try:
            # the global RNG comes out as it went in: a grid (drawn on rank zero only, and not
            # again by a resumed run) never changes what training draws next
            with torch.random.fork_rng(devices=[]):
                images, nrow = self.make(pl_module)
            save_image_grid(path, images.float().cpu(), nrow=nrow)
        except Exception as err:  # a diagnostic never stops training
            logger.warning("skipped %s (%s: %s)", path.name, type(err).__name__, err)
            return
        finally:
            pl_module.train(was_training)
        logger.info("wrote %s", path)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)


PROGRESS_LOGGER = "vqprior.train.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress(Callback):
    """A plain progress line through logging (``vqprior.train.progress``, INFO) for runs
    without a terminal (a batch job, a pipe): step, loss, images/s, time left.

    A line every ``max_steps // 10`` steps or every ``every_s`` seconds, whichever comes first
    (only the seconds when a time budget alone bounds the run), and one at the end. Rank zero
    only.
    """

    def __init__(
        self, batch_size: int, every_s: float = 30.0, deadline: float | None = None
    ) -> None:
        """``deadline``: the ``time.time()`` at which a ``train.max_time_s`` budget ends."""
        self.batch_size, self.every_s, self.deadline = batch_size, every_s, deadline
        self._start = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def line(self, trainer: L.Trainer, now: float) -> str:
        step, total = trainer.global_step, _step_bound(trainer)
        loss = trainer.callback_metrics.get("train/loss")
        done, elapsed = step - self._first_step, max(now - self._start, 1e-9)
        speed = done * self.batch_size * trainer.world_size / elapsed
        left = (total - step) * elapsed / done if done and total else math.inf
        if self.deadline is not None and done:
            left = max(0.0, min(left, self.deadline - time.time()))
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        parts.append(f"{speed:.1f} img/s")
        parts.append(f"{_clock(elapsed)} elapsed, {_clock(left)} left")
        return ", ".join(parts)

    @rank_zero_only
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now, total = time.monotonic(), _step_bound(trainer)
        every = max(1, total // 10) if total else 0  # 0: by the clock alone
        if (every and trainer.global_step % every == 0) or now - self._last >= self.every_s:
            self._last = now
            progress_log.info("%s", self.line(trainer, now))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        progress_log.info("%s (done)", self.line(trainer, time.monotonic()))


class LastValidation(Callback):
    """The global step of this launch's last validation (None: none yet), so that a run which
    already validated its final weights (Lightning validates when a run stops early) is not
    validated twice."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


FIT_AFTER = 20  # steps timed before a cosine schedule's horizon is fitted to a time budget
VAL_SHARE = 0.1  # of a time budget, for validations (unless train.val_batches is set)
STEPS_END_FIRST = 1.1  # steps that fit the budget over max_steps, above which a line says so
MIN_VAL_BATCHES = 4


class TimeBudget(Callback):
    """``train.max_time_s``: the whole stage's wall-clock budget, counted from ``started`` (the
    stage's start, so loading and encoding count), the same on every rank.

    Training stops early enough that the validation which follows the stop (Lightning runs one
    when a run stops early; the export is chosen by it) also fits: the reserve is the last
    validation's measured time, or before one has run the val batches times a training step's
    pace. :data:`FIT_AFTER` steps into the run, validation is capped to the first val batches
    that keep it near :data:`VAL_SHARE` of the budget, and a cosine schedule is fitted: the
    pace of the steps after the first (plus the periodic validations still due) predicts the
    step count left, and the schedule's horizon becomes ``min(max_steps, predicted)`` (rank
    zero's prediction on every rank)."""

    def __init__(self, train: Any, started: float | None = None) -> None:
        self.seconds, self.train = float(train.max_time_s), train
        self.started = time.time() if started is None else started
        self.first_step, self.first_time = -1, 0.0
        self.pace = 0.0  # seconds per training step (validations excluded), once measured
        self.val_s: float | None = None  # the last validation's duration
        self.val_batches = 0  # batches one validation runs (0: no validation)
        self.horizon: int | None = None
        self._val_started, self._val_total = 0.0, 0.0

    def elapsed(self) -> float:
        return time.time() - self.started

    def reserve(self) -> float:
        """Seconds kept for the validation that follows the stop."""
        return self.val_s if self.val_s is not None else self.val_batches * self.pace

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_batches = _val_batches(trainer, self.train)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_started = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_s = time.time() - self._val_started
        self._val_total += self.val_s

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.first_step < 0:  # the run's (or the resumed run's) first step: start-up, untimed
            self.first_step, self.first_time = step, self.elapsed()
            self._val_total = 0.0
        elif step > self.first_step:
            spent = self.elapsed() - self.first_time - self._val_total
            self.pace = spent / (step - self.first_step)
        if step == self.first_step + FIT_AFTER:
            if self.val_s is None and self.val_batches and not self.train.val_batches:
                self._cap_validation(trainer)
            left = self._steps_left(trainer)
            if self.train.lr_schedule == "cosine":
                horizon = min(self.train.steps, step + max(1, left))
                self.horizon = int(trainer.strategy.broadcast(horizon, src=0))
                for config in trainer.lr_scheduler_configs:
                    refit_schedule(config.scheduler, replace(self.train, max_steps=self.horizon))
            if trainer.is_global_zero:
                self._say_if_steps_end_first(step, left)
        # the reserve counts once validation is planned (capped) or measured
        planned = step >= self.first_step + FIT_AFTER or self.val_s is not None
        stop = self.elapsed() + (self.reserve() if planned else 0.0) >= self.seconds
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            trainer.should_stop = True

    def _cap_validation(self, trainer: L.Trainer) -> None:
        """Before the first validation: validate on the first val batches only, as many as keep
        the run's validations (the periodic ones and the last) near :data:`VAL_SHARE` of the
        budget at the training pace (unless ``train.val_batches`` chose; rank zero's count)."""
        steps = trainer.global_step + (self.seconds - self.elapsed()) / max(self.pace, 1e-9)
        interval = _val_interval(trainer)
        validations = 1 + (int(min(steps, self.train.steps)) // interval if interval else 0)
        cap = int(VAL_SHARE * self.seconds / (validations * max(self.pace, 1e-9)))
        cap = int(trainer.strategy.broadcast(max(MIN_VAL_BATCHES, cap), src=0))
        if cap >= self.val_batches:
            return
        if trainer.is_global_zero:  # on the progress logger: the CLI shows it
            logging.getLogger("vqprior.train.progress").info(
                "validating on the first %d of %d val batches to fit train.max_time_s "
                "(set train.val_batches to choose)",
                cap,
                self.val_batches,
            )
        module: Any = trainer.lightning_module  # a StageModule (vqprior.train.module)
        module.max_val_batches = self.val_batches = cap

    def _say_if_steps_end_first(self, step: int, steps_left: int) -> None:
        """One line on the progress logger when a ``train.max_steps`` the config names will end
        the run well before its budget (unset, the budget alone bounds the run)."""
        fit, cap = step + steps_left, self.train.steps
        if fit <= STEPS_END_FIRST * cap or steps_left <= 0:
            return
        now = self.elapsed()
        end = now + (self.seconds - now) * (cap - step) / steps_left
        logging.getLogger("vqprior.train.progress").info(
            "train.max_steps=%d will end this run after about %.0f s of its %.0f s budget "
            "(about %d steps would fit): raise train.max_steps, or leave it unset, to use all of it",
            cap,
            end,
            self.seconds,
            fit,
        )

    def _steps_left(self, trainer: L.Trainer) -> int:
        """Steps that fit in the time left, each paying its share of the periodic validations."""
        left = self.seconds - self.elapsed() - self.reserve()
        interval = _val_interval(trainer)
        per_val = self.reserve() / interval if interval else 0.0
        return int(left / max(self.pace + per_val, 1e-9))


def _step_bound(trainer: L.Trainer) -> int:
    """The trainer's ``max_steps``; 0 where a time budget alone bounds the run."""
    total = int(trainer.max_steps)
    return total if 0 < total < UNBOUNDED else 0


def _val_interval(trainer: L.Trainer) -> int:
    """Training steps between periodic validations (0: none)."""
    interval = getattr(trainer, "val_check_batch", None)
    return interval if isinstance(interval, int) and interval > 0 else 0


def _val_batches(trainer: L.Trainer, train: Any) -> int:
    """Batches one validation runs: the val loader's length, capped by ``train.val_batches``
    (0 without validation or when the loader has no length)."""
    if not trainer.limit_val_batches:
        return 0
    try:
        n = len(trainer.datamodule.val_dataloader())  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return 0
    return min(n, train.val_batches) if train.val_batches else n


def refit_schedule(sched: Any, train: Any) -> None:
    """Give a ``LambdaLR`` ``sched`` the schedule of ``train`` from its current step on."""
    factor = lr_lambda(train)
    sched.lr_lambdas = [factor] * len(sched.optimizer.param_groups)
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
        group["lr"] = base * factor(sched.last_epoch)
