"""Defaults per second of training: held-out bits/dim each prior setting reaches in a fixed budget.

``python -m vqprior.bench.sweep --data npz:../shared/data/cifar10-3k/train.npz --budget 300
--arm default --arm "wide:channels=96" --arm "bf16:precision=bf16"`` trains one pixel prior
per arm for ``--budget`` wall-clock seconds and reports the held-out bits/dim (float32, the
Polyak-averaged weights that an export keeps) it reached. Each arm is its own subprocess with
``--threads`` threads; ``--parallel`` arms run at once, so on a 2-core machine two one-thread
arms share it evenly. The training is the training stage's own (:mod:`vqprior.bench.budget`):
``PriorModule`` under a Lightning Trainer stopped at the budget; a cosine lr decays to zero
at the step count the first 20 steps predict for the budget; bf16 arms run ``bf16-mixed``.

An arm is ``name[:key=value,...]`` over :class:`~vqprior.models.pixelcnn.PixelCNNConfig`
fields (``channels``, ``num_layers``, ``kernel_size``, ``backbone``, ...), the
:class:`~vqprior.train.config.TrainConfig` fields ``lr``, ``lr_schedule``, ``warmup_steps``,
``batch_size``, ``weight_decay``, ``adam_beta2``, ``ema_decay``, ``grad_clip``, and
``precision`` (fp32 | bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vqprior.io import atomic_write_text

TRAIN_KEYS = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "batch_size",
    "weight_decay",
    "adam_beta2",
    "ema_decay",
    "grad_clip",
)


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, overrides) with YAML-typed values."""
    import yaml

    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"arm {text!r} needs a name before ':'")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"arm {name!r}: {item!r} is not key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        overrides[key.strip()] = parsed
    return name, overrides


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    from vqprior.models.pixelcnn import PixelCNNConfig

    model_keys = {f.name for f in dataclasses.fields(PixelCNNConfig)}
    model, train, precision = {}, {}, "fp32"
    for key, value in overrides.items():
        if key == "precision":
            if value not in ("fp32", "bf16"):
                raise ValueError(f"precision must be fp32 or bf16, got {value!r}")
            precision = value
        elif key in TRAIN_KEYS:
            train[key] = value
        elif key in model_keys:
            model[key] = value
        else:
            raise ValueError(f"unknown arm key {key!r}")
    return model, train, precision


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one arm for ``spec["budget"]`` seconds in this process; return its figures.

    The training is the training stage's: a :class:`~vqprior.train.prior.PriorModule` (AdamW,
    warmup and lr schedule, EMA) fitted by a Lightning Trainer until the budget runs out.
    """
    import torch

    from vqprior.bench.budget import fit_for, held_out_bits, load_split, prior_module

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model_kw, train_kw, precision = _split(spec["overrides"])
    split = load_split(spec["data"], spec["held_out"], spec["limit"])
    module = prior_module(split.train_x.shape[1:], model_kw, train_kw)
    clock = fit_for(module, split, spec["budget"], precision, spec["seed"])
    batch = module.train_cfg.batch_size
    row = {
        "arm": spec["name"],
        "overrides": spec["overrides"],
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "steps": clock.steps,
        "images_per_s": clock.steps * batch / clock.elapsed if clock.elapsed else 0.0,
        "trained_s": round(clock.elapsed, 1),
        "held_out_bits_per_dim": held_out_bits(module.eval_model, split.held_x, split.held_y),
    }
    return {**row, "cosine_horizon": clock.horizon} if clock.horizon else row


def _launch(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, "-m", "vqprior.bench.sweep", "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"arm": spec["name"], "overrides": spec["overrides"], "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_rows(rows: Sequence[dict[str, Any]], budget: float) -> list[str]:
    lines = [
        f"held-out bits/dim after {budget:g} s of training per arm (lower is better)",
        f"{'arm':<16}{'overrides':<44}{'params':>9}{'steps':>7}{'img/s':>7}{'bits/dim':>10}",
    ]
    for r in rows:
        over = ",".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(defaults)"
        if "error" in r:
            lines.append(f"{r['arm']:<16}{over:<44}  error: {r['error']}")
            continue
        lines.append(
            f"{r['arm']:<16}{over:<44}{r['parameters']:>9}{r['steps']:>7}"
            f"{r['images_per_s']:>7.1f}{r['held_out_bits_per_dim']:>10.3f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m vqprior.bench.sweep", description=__doc__)
    parser.add_argument(
        "--data", help="digits or npz:PATH (the last --held-out images held out), or mnist:ROOT"
    )
    parser.add_argument("--arm", action="append", default=[], help="name[:key=value,...]")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per arm")
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="cap the training images")
    parser.add_argument("--threads", type=int, default=1, help="threads per arm")
    parser.add_argument("--parallel", type=int, default=2, help="arms at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sweep.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.worker:
        print(json.dumps(run_arm(json.loads(args.worker))))  # noqa: T201 - worker protocol
        return []
    if not args.data or not args.arm:
        parser.error("--data and at least one --arm are required")
    specs = []
    for text in args.arm:
        name, overrides = parse_arm(text)
        _split(overrides)  # unknown keys fail here, before any training
        specs.append(
            {
                "name": name,
                "overrides": overrides,
                "data": args.data,
                "budget": args.budget,
                "held_out": args.held_out,
                "limit": args.limit,
                "threads": args.threads,
                "seed": args.seed,
            }
        )
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(_launch, specs))
    atomic_write_text(Path(args.out), json.dumps(rows, indent=2) + "\n")
    print("\n".join(format_rows(rows, args.budget)))  # noqa: T201 - the command's output
    return rows


if __name__ == "__main__":
    main()
