"""Defaults per second of training: held-out bits/dim each prior setting reaches in a fixed budget.

``python -m vqprior.bench_sweep --data npz:../shared/data/cifar10-3k/train.npz --budget 300
--arm default --arm "wide:channels=96" --arm "bf16:precision=bf16"`` trains one pixel prior
per arm for ``--budget`` wall-clock seconds and reports the held-out bits/dim (float32, the
Polyak-averaged weights that an export keeps) it reached. Each arm is its own subprocess with
``--threads`` threads; ``--parallel`` arms run at once, so on a 2-core machine two one-thread
arms share it evenly. The training loop is the training stage's: AdamW, gradient clipping,
linear warmup then constant or cosine lr (the cosine horizon is the step count the first 20
steps predict for the budget), EMA; bf16 arms autocast with the likelihood in fp32 and
channels-last weights, as ``--precision bf16-mixed`` does.

An arm is ``name[:key=value,...]`` over :class:`~vqprior.models.pixelcnn.PixelCNNConfig`
fields (``channels``, ``num_layers``, ``kernel_size``, ``backbone``, ...), the
:class:`~vqprior.train.config.TrainConfig` fields ``lr``, ``lr_schedule``, ``warmup_steps``,
``batch_size``, ``weight_decay``, ``ema_decay``, ``grad_clip``, and ``precision`` (fp32 | bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from vqprior.io import atomic_write_text

TRAIN_KEYS = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "batch_size",
    "weight_decay",
    "ema_decay",
    "grad_clip",
)
LN2 = math.log(2.0)


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


def load_split(data: str, held_out: int, limit: int | None) -> tuple[Any, Any]:
    """(train, held-out) float image tensors in [-1, 1]; the held-out images are the last ones."""
    import torch

    from vqprior.data import DataConfig, load_image_splits

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
    train_set, test_set = cast(Sized, splits.train), cast(Sized, splits.test)
    images = torch.stack([splits.train[i][0] for i in range(len(train_set))])
    if kind == "mnist":  # the official test split is the held-out set
        test = torch.stack([splits.test[i][0] for i in range(min(held_out, len(test_set)))])
        return images[:limit] if limit else images, test
    train, test = images[:-held_out], images[-held_out:]
    return (train[:limit] if limit else train), test


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one arm for ``spec["budget"]`` seconds in this process; return its figures."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
    from vqprior.train.config import TrainConfig
    from vqprior.train.module import lr_lambda
    from vqprior.train.prior import warmup_ema

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model_kw, train_kw, precision = _split(spec["overrides"])
    train_x, held = load_split(spec["data"], spec["held_out"], spec["limit"])
    c, h, w = train_x.shape[1:]
    model = PixelCNN(PixelCNNConfig(in_channels=c, height=h, width=w, **model_kw))
    bf16 = precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    cfg = TrainConfig(**{"max_steps": 10**9, **train_kw})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=warmup_ema(cfg.ema_decay)) if cfg.ema_decay else None
    gen = torch.Generator().manual_seed(spec["seed"])
    factor = lr_lambda(cfg)
    step, started, horizon_set = 0, time.perf_counter(), False
    while (elapsed := time.perf_counter() - started) < spec["budget"]:
        if step == 20 and not horizon_set and cfg.lr_schedule == "cosine":
            steps = int(spec["budget"] / (elapsed / step))  # the budget's predicted step count
            cfg, horizon_set = dataclasses.replace(cfg, max_steps=max(steps, step + 1)), True
            factor = lr_lambda(cfg)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor(step)
        idx = torch.randint(len(train_x), (cfg.batch_size,), generator=gen)
        x = train_x[idx]
        if bf16:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = -model.log_prob(x, reduction="mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
    trained_s = time.perf_counter() - started
    final = ema.module if ema is not None else model
    assert isinstance(final, PixelCNN)
    final = final.float().eval()
    with torch.no_grad():
        nats = torch.cat([final.log_prob(held[i : i + 100]) for i in range(0, len(held), 100)])
    bits = (-nats.mean() / final.num_dims / LN2).item()
    return {
        "arm": spec["name"],
        "overrides": spec["overrides"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "images_per_s": step * cfg.batch_size / trained_s,
        "trained_s": round(trained_s, 1),
        "held_out_bits_per_dim": bits,
    }


def _launch(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, "-m", "vqprior.bench_sweep", "--worker", json.dumps(spec)]
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
    parser = argparse.ArgumentParser(prog="python -m vqprior.bench_sweep", description=__doc__)
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
