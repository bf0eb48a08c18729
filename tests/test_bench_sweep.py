"""The defaults-per-second sweep: arm parsing, and short arms on the embedded digits trained by
the training stage's PriorModule under a Lightning Trainer stopped at the budget."""

from __future__ import annotations

import math
from typing import Any

import pytest

from vqprior.bench.sweep import format_rows, main, parse_arm, run_arm
from vqprior.train.callbacks import FIT_AFTER
from vqprior.train.prior import PriorModule

SPEC: dict[str, Any] = {
    "name": "tiny",
    "overrides": {
        "channels": 8,
        "num_layers": 2,
        "num_mixtures": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 2,
    },
    "data": "digits",
    "budget": 2.0,
    "held_out": 100,
    "limit": None,
    "threads": 1,
    "seed": 0,
}


def test_arms_parse_typed_overrides_and_reject_unknown_keys(tmp_path) -> None:
    assert parse_arm("default") == ("default", {})
    name, over = parse_arm("fast:channels=32,lr=1e-3,precision=bf16,lr_schedule=cosine")
    assert name == "fast"
    assert over == {"channels": 32, "lr": 1e-3, "precision": "bf16", "lr_schedule": "cosine"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_arm("x:channels")
    from vqprior.bench.sweep import _split

    assert _split(parse_arm("b:adam_beta2=0.95,channels=8")[1]) == (
        {"channels": 8},
        {"adam_beta2": 0.95},
        "fp32",
    )
    with pytest.raises(ValueError, match="unknown arm key 'depth'"):
        main(["--data", "digits", "--arm", "x:depth=3", "--out", str(tmp_path / "s.json")])
    with pytest.raises(ValueError, match="precision must be"):
        main(["--data", "digits", "--arm", "x:precision=fp16", "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_one_arm_trains_through_prior_module_for_its_budget(monkeypatch) -> None:
    calls: list[int] = []
    step = PriorModule.training_step

    def counted(self: PriorModule, batch: Any, batch_idx: int) -> Any:
        calls.append(batch_idx)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PriorModule, "training_step", counted)
    untrained = run_arm({**SPEC, "budget": 0.0})
    assert untrained["steps"] == 0 and not calls
    row = run_arm(SPEC)
    assert row["steps"] == len(calls) > FIT_AFTER  # every step is the stage's training_step
    assert row["cosine_horizon"] > FIT_AFTER  # predicted from the first steps' timing
    assert 2.0 <= row["trained_s"] < 10.0
    assert math.isfinite(row["held_out_bits_per_dim"])
    assert row["held_out_bits_per_dim"] < untrained["held_out_bits_per_dim"] - 0.1
    lines = format_rows([row, {"arm": "bad", "overrides": {}, "error": "boom"}], 2.0)
    assert "tiny" in lines[2] and "error: boom" in lines[3]
