"""train.max_time_s: a run stops on a wall-clock budget (counted from the stage's start), a
cosine schedule is fitted to it, and the budget is not part of the run's identity."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from vqprior.config import ConfigError
from vqprior.train import callbacks
from vqprior.train import config as train_config
from vqprior.train.config import DEFAULT_MAX_STEPS, UNBOUNDED, DeviceOptions, TrainConfig
from vqprior.train.stages import train_prior

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CPU = DeviceOptions(accelerator="cpu", devices="1", progress=False)


def _cfg(**train: Any) -> dict[str, Any]:
    cfg = yaml.safe_load((TINY / "prior_pixels.yaml").read_text())
    cfg["train"] = {**cfg["train"], "image_every_n_steps": 0, **train}
    return cfg


def test_budget_stops_the_run_and_fits_the_cosine_horizon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks: list[callbacks.TimeBudget] = []
    original = callbacks.TimeBudget.__init__

    def spy(self: callbacks.TimeBudget, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        clocks.append(self)

    monkeypatch.setattr(callbacks.TimeBudget, "__init__", spy)
    budget = 4.0
    cfg = _cfg(max_steps=100_000, max_time_s=budget, lr_schedule="cosine", val_every_n_steps=50)
    summary = train_prior(cfg, tmp_path, CPU, callbacks=[validations := _Validations()])
    (clock,) = clocks
    steps = summary["global_step"]
    assert callbacks.FIT_AFTER < steps < 100_000  # the budget ended it, not max_steps
    assert clock.elapsed() >= budget and summary["wall_time_s"] < budget + 15
    assert clock.horizon is not None and clock.horizon > callbacks.FIT_AFTER
    # the fitted horizon predicts the steps the budget allowed (within the pace's noise)
    assert 0.4 < steps / clock.horizon < 2.5
    # the stop's validation (Lightning's, inside fit) is the last: the final weights are not
    # validated twice, and the budget kept time for it
    assert validations.steps[-1] == steps and validations.steps.count(steps) == 1
    assert clock.val_s is not None and clock.reserve() == clock.val_s
    # the budget is per invocation: a rerun with another budget resumes the same run
    again = train_prior({**cfg, "train": {**cfg["train"], "max_time_s": 2.0}}, tmp_path, CPU)
    assert again["global_step"] > steps


class _Validations(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.steps.append(trainer.global_step)


class _Strategy:
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


@pytest.mark.parametrize(("max_steps", "horizon"), [(30, 30), (None, 10**8)])
def test_horizon_is_capped_by_max_steps_and_refits_the_lr(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    max_steps: int | None,
    horizon: int,
) -> None:
    """At 0.01 s a step a 1e6 s budget fits ~1e8 steps: the horizon is max_steps=30, or with
    max_steps unset all ~1e8 (not 10,000, and no line says a step bound ends the run first),
    and the lr follows the cosine of that horizon from the current step on."""
    import torch

    train = TrainConfig(max_steps=max_steps, max_time_s=1e6, lr_schedule="cosine", lr=1.0)
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    clock = callbacks.TimeBudget(train, started=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = SimpleNamespace(
        global_step=0,
        strategy=_Strategy(),
        lr_scheduler_configs=[SimpleNamespace(scheduler=sched)],
        is_global_zero=True,
        should_stop=False,
    )
    with caplog.at_level("INFO", logger="vqprior.train.progress"):
        for step in range(1, callbacks.FIT_AFTER + 2):  # the first step is not timed
            trainer.global_step, now[0] = step, step * 0.01
            opt.step()
            sched.step()
            clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert clock.horizon == pytest.approx(horizon, rel=0.01) and not trainer.should_stop
    said = [r for r in caplog.records if "max_steps" in r.getMessage()]
    assert len(said) == (max_steps is not None)
    expected = 0.5 * (1 + math.cos(math.pi * sched.last_epoch / clock.horizon))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    now[0] = 1e6  # the budget is spent: the next step stops the run
    clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert trainer.should_stop


@pytest.mark.parametrize(("max_steps", "budget", "said"), [(30, 1e6, True), (10_000, 1.0, False)])
def test_a_line_says_when_max_steps_will_end_the_run_before_its_budget(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    max_steps: int,
    budget: float,
    said: bool,
) -> None:
    """At 0.01 s a step, 1e6 s fit ~1e8 steps (max_steps=30 ends the run first: one line with
    the time it will end); 1 s fits ~100 steps, well inside max_steps=10,000 (no line)."""
    train = TrainConfig(max_steps=max_steps, max_time_s=budget)
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    clock = callbacks.TimeBudget(train, started=0.0)
    trainer = SimpleNamespace(
        global_step=0, strategy=_Strategy(), is_global_zero=True, should_stop=False
    )
    with caplog.at_level("INFO", logger="vqprior.train.progress"):
        for step in range(1, callbacks.FIT_AFTER + 2):
            trainer.global_step, now[0] = step, step * 0.01
            clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    if not said:
        assert lines == []
        return
    (line,) = lines
    # 9 steps left of 30 at 0.01 s each: the run ends at ~0.3 s of its 1e6 s
    assert line.startswith("train.max_steps=30 will end this run after about 0 s of its 1000000 s")
    assert "raise train.max_steps" in line


def test_unset_max_steps_is_bounded_by_the_budget_or_by_the_default() -> None:
    assert TrainConfig().max_steps is None and TrainConfig().steps == DEFAULT_MAX_STEPS == 10_000
    assert TrainConfig(max_time_s=60.0).steps == UNBOUNDED  # the budget ends the run
    assert TrainConfig(max_steps=30, max_time_s=60.0).steps == 30  # a named bound still holds
    assert train_config.recorded_steps(None) == DEFAULT_MAX_STEPS
    assert train_config.recorded_steps(None, 60.0) == UNBOUNDED
    assert train_config.recorded_steps(7, 60.0) == 7
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_a_budget_bounds_a_run_without_max_steps_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default bound shrunk to 5 steps: a budgeted run without ``max_steps`` trains past
    it until its budget ends; rerun without a budget it resumes at its step and trains no
    further (the bound without a budget is the default again), and a fresh run without a budget
    stops at the default."""
    monkeypatch.setattr(train_config, "DEFAULT_MAX_STEPS", 5)
    cfg = _cfg(max_time_s=3.0, lr_schedule="cosine")
    del cfg["train"]["max_steps"]
    summary = train_prior(cfg, tmp_path / "budget", CPU)
    assert summary["global_step"] > 5  # past the bound it would have without a budget
    assert "max_steps: null" in (tmp_path / "budget" / "config.yaml").read_text()
    unbudgeted = {**cfg, "train": {**cfg["train"], "max_time_s": 0.0}}
    again = train_prior(unbudgeted, tmp_path / "budget", CPU)
    assert again["global_step"] == summary["global_step"]
    assert train_prior(unbudgeted, tmp_path / "fresh", CPU)["global_step"] == 5


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_time_s"):
        TrainConfig(max_time_s=-1.0)


def test_progress_lines_count_down_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal, the time left is the budget's when it ends before max_steps would."""
    now = [100.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now[0])
    progress = callbacks.PlainProgress(32, deadline=160.0)
    trainer = SimpleNamespace(global_step=0, max_steps=10_000, callback_metrics={}, world_size=1)
    progress.on_train_start(trainer, None)  # type: ignore[arg-type]
    trainer.global_step, now[0] = 10, 110.0  # 10 steps in 10 s: 9,990 s left by steps
    assert progress.line(trainer, now[0]).endswith("0:00:50 left")  # type: ignore[arg-type]
    trainer.max_steps = UNBOUNDED  # no max_steps: the budget alone, and no step total
    line = progress.line(trainer, now[0])  # type: ignore[arg-type]
    assert line.startswith("step 10, ") and line.endswith("0:00:50 left")


def test_progress_lines_without_a_step_bound_come_by_the_clock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now[0])
    progress = callbacks.PlainProgress(8, every_s=30.0, deadline=1e9)
    trainer = SimpleNamespace(global_step=0, max_steps=UNBOUNDED, callback_metrics={}, world_size=1)
    progress.on_train_start(trainer, None)  # type: ignore[arg-type]
    with caplog.at_level("INFO", logger=callbacks.PROGRESS_LOGGER):
        for step in range(1, 101):  # a step a second: a line at 30, 60 and 90 s only
            trainer.global_step, now[0] = step, float(step)
            progress.on_train_batch_end(trainer, None, None, None, step)  # type: ignore[arg-type]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "step 30", "step 60", "step 90"
    ]  # fmt: skip


def test_the_budget_keeps_time_for_the_last_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a validation has run the reserve is the val batches at the training pace; after,
    the measured validation time; the run stops once the time left no longer covers it."""
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    clock = callbacks.TimeBudget(TrainConfig(max_time_s=100.0), started=0.0)
    loader = list(range(7))  # 7 val batches
    trainer = SimpleNamespace(
        global_step=0,
        strategy=_Strategy(),
        lr_scheduler_configs=[],
        should_stop=False,
        limit_val_batches=1.0,
        datamodule=SimpleNamespace(val_dataloader=lambda: loader),
        sanity_checking=False,
    )
    clock.on_train_start(trainer, None)  # type: ignore[arg-type]
    assert clock.val_batches == 7 and clock.reserve() == 0.0
    for step in range(1, 11):  # 1 s per step after the first
        trainer.global_step, now[0] = step, 10.0 + step
        clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert clock.pace == pytest.approx(1.0) and clock.reserve() == pytest.approx(7.0)
    clock.on_validation_start(trainer, None)  # type: ignore[arg-type]
    now[0] += 30.0  # a periodic validation: 30 s, not counted in the pace
    clock.on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert clock.reserve() == pytest.approx(30.0)
    trainer.global_step, now[0] = 11, now[0] + 1.0  # 51 s elapsed + 30 s reserve < 100
    clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert clock.pace == pytest.approx(1.0) and not trainer.should_stop
    trainer.global_step, now[0] = 12, 70.5  # 70.5 + 30 >= 100: stop, the validation still fits
    clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert trainer.should_stop
    trainer.limit_val_batches = 0  # no validation: nothing is reserved
    clock.on_train_start(trainer, None)  # type: ignore[arg-type]
    assert clock.val_batches == 0


def test_validation_is_capped_to_a_share_of_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A val split that would eat the budget is cut to its first batches before the first
    validation; ``train.val_batches`` set by the user is left alone."""
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    for user_batches in (None, 500):
        now[0] = 0.0
        train = TrainConfig(max_time_s=1000.0, max_steps=10_000, val_batches=user_batches)
        clock = callbacks.TimeBudget(train, started=0.0)
        trainer = SimpleNamespace(
            global_step=0,
            strategy=_Strategy(),
            lr_scheduler_configs=[],
            should_stop=False,
            limit_val_batches=user_batches or 1.0,
            datamodule=SimpleNamespace(val_dataloader=lambda: range(1000)),
            val_check_batch=500,
            is_global_zero=True,
            lightning_module=SimpleNamespace(max_val_batches=None),
        )
        clock.on_train_start(trainer, None)  # type: ignore[arg-type]
        for step in range(1, callbacks.FIT_AFTER + 2):  # 1 s per step: ~1,000 steps, 3 vals
            trainer.global_step, now[0] = step, float(step)
            clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
        # 10% of 1,000 s over 3 validations at 1 s per batch: 33 batches
        if user_batches is None:
            assert trainer.lightning_module.max_val_batches == clock.val_batches == 33
        else:  # Lightning's limit_val_batches already holds the user's choice
            assert trainer.lightning_module.max_val_batches is None
            assert clock.val_batches == user_batches
