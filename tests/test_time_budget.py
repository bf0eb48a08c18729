"""train.max_time_s: a run stops on a wall-clock budget (counted from the stage's start), a
cosine schedule is fitted to it, and the budget is not part of the run's identity."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from vqprior.config import ConfigError
from vqprior.train import callbacks
from vqprior.train.config import DeviceOptions, TrainConfig
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
    summary = train_prior(cfg, tmp_path, CPU)
    (clock,) = clocks
    steps = summary["global_step"]
    assert callbacks.FIT_AFTER < steps < 100_000  # the budget ended it, not max_steps
    assert clock.elapsed() >= budget and summary["wall_time_s"] < budget + 15
    assert clock.horizon is not None and clock.horizon > callbacks.FIT_AFTER
    # the fitted horizon predicts the steps the budget allowed (within the pace's noise)
    assert 0.4 < steps / clock.horizon < 2.5
    # the budget is per invocation: a rerun with another budget resumes the same run
    again = train_prior({**cfg, "train": {**cfg["train"], "max_time_s": 2.0}}, tmp_path, CPU)
    assert again["global_step"] > steps


class _Strategy:
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def test_horizon_is_capped_by_max_steps_and_refits_the_lr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A budget far larger than max_steps needs: the horizon is max_steps and the lr follows
    the cosine of that horizon from the current step on."""
    import torch

    train = TrainConfig(max_steps=30, max_time_s=1e6, lr_schedule="cosine", lr=1.0)
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: now[0])
    clock = callbacks.TimeBudget(train, started=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = SimpleNamespace(
        global_step=0,
        strategy=_Strategy(),
        lr_scheduler_configs=[SimpleNamespace(scheduler=sched)],
        should_stop=False,
    )
    for step in range(1, callbacks.FIT_AFTER + 2):  # the first step is not timed
        trainer.global_step, now[0] = step, step * 0.01
        opt.step()
        sched.step()
        clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert clock.horizon == 30 and not trainer.should_stop
    expected = 0.5 * (1 + math.cos(math.pi * sched.last_epoch / 30))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    now[0] = 1e6  # the budget is spent: the next step stops the run
    clock.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert trainer.should_stop


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
