"""``vqprior bench``: sampling and training speed, as ratios against baselines in the same run.

Sampling (:mod:`vqprior.bench.sampling`): the reference loop (one full forward pass per
sequential step) against the default fast exact sampler, for a 32x32x3 pixel prior and 8x8 /
16x16 code-map priors; the reference loop is timed on a prefix of steps and extrapolated (the
table says how many), and on that prefix both samplers must agree exactly.

Training (:mod:`vqprior.bench.train`): images per second of the VQ-VAE, the default priors and
the PixelCNN++ port's tiny config, in fp32 and bf16 autocast, eager and (``--compile``)
compiled, each as a ratio to the model's fp32 eager row timed interleaved with it.
``--baseline-tree DIR`` (:mod:`vqprior.bench.ab`) times another source tree in alternating
subprocesses, each precision against the same precision there; ``--profile`` (:mod:`vqprior.bench.profile`) shows where a step's time goes.

``python -m vqprior.bench.sweep`` (:mod:`vqprior.bench.sweep`) is not speed but quality per
second: the held-out bits/dim each prior setting reaches in a fixed wall-clock budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch

from vqprior.bench.ab import compare_trees, format_ab
from vqprior.bench.profile import format_profiles, profile_rows
from vqprior.bench.sampling import SAMPLING_MODELS, bench_sampling
from vqprior.bench.train import (
    DEFAULT_TRAIN_MODELS,
    PRECISIONS,
    TRAIN_MODELS,
    format_training,
    training_rows,
)
from vqprior.io import atomic_write_text

log = logging.getLogger(__name__)


def format_table(result: dict) -> str:
    lines = [
        f"device: {result['device']}  torch {result['torch']}  threads {result['threads']}",
        "",
        "sampling (reference loop vs fast exact sampler)",
        f"{'model':<16}{'batch':>6}{'steps':>7}{'timed':>7}{'naive s':>11}{'fast s':>9}{'speedup':>9}{'passes':>8}  method       equal",
    ]
    for r in result["sampling"]:
        lines.append(
            f"{r['model']:<16}{r['batch']:>6}{r['steps']:>7}{r['naive_steps_timed']:>7}"
            f"{r['naive_s']:>11.2f}{r['fast_s']:>9.2f}{r['speedup']:>8.1f}x"
            f"{r.get('passes', float('nan')):>8.1f}  {r['fast_method']:<12} {r['prefix_equal']}"
        )
    lines += [
        "",
        "naive times are extrapolated from the timed prefix of steps (constant cost per step);",
        "passes: the fast sampler's time in full forward passes on the same batch (limit: 1)",
    ]
    if result["training"]:
        lines += ["", *format_training(result["training"])]
    if result.get("baseline"):
        lines += ["", *format_ab(result["baseline"], result["baseline_tree"])]
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    batch: int = 32
    steps: int = 5  # interleaved timed steps per variant; 0 skips training figures
    models: Sequence[str] | None = None  # default: DEFAULT_TRAIN_MODELS (not the GPU-only rows)
    precisions: Sequence[str] = PRECISIONS
    compile: bool = False  # add torch.compile variants (slow to compile on a CPU)
    baseline_tree: str | None = None  # another source tree timed in alternating subprocesses
    repeats: int = 3  # alternations against the baseline tree
    threads: int = 0  # worker threads for the baseline comparison (0: this process's)
    baseline_jobs: Sequence[str] = ("train",)  # what the baseline comparison times


def run_bench(
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1, 16, 64),
    models: Sequence[str] | None = None,
    naive_steps: int = 32,
    train: TrainOptions | None = None,
) -> dict:
    dev = torch.device(device)
    opts = train or TrainOptions()
    rows = []
    for name in SAMPLING_MODELS if models is None else models:
        if name not in SAMPLING_MODELS:
            raise ValueError(f"unknown bench model {name!r}; choose from {sorted(SAMPLING_MODELS)}")
        for batch in batch_sizes:
            log.info("sampling %s batch %d", name, batch)
            rows.append(
                asdict(bench_sampling(name, SAMPLING_MODELS[name], batch, dev, naive_steps))
            )
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "sampling": rows,
        "training": [],
        "baseline": [],
        "baseline_tree": opts.baseline_tree,
    }
    if opts.steps:
        train_rows = training_rows(
            dev, opts.batch, opts.steps, opts.models, opts.precisions, opts.compile
        )
        result["training"] = [asdict(r) for r in train_rows]
    for job in opts.baseline_jobs if opts.baseline_tree else ():
        ab = compare_trees(
            Path(opts.baseline_tree or ""),
            [
                name
                for name in opts.models or DEFAULT_TRAIN_MODELS
                if job == "train" or TRAIN_MODELS[name][0] == "prior"  # what samples
            ],
            opts.precisions if job == "train" else ("fp32",),
            opts.batch if job == "train" else 16,
            max(opts.steps, 1),
            opts.repeats,
            opts.threads or torch.get_num_threads(),
            job,
        )
        cast(list, result["baseline"]).extend(asdict(r) for r in ab)
    return result


def _names(text: str, known: Sequence[str], flag: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    for n in names:
        if n not in known:
            raise ValueError(f"{flag}: unknown name {n!r}; choose from {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqprior bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    parser.add_argument("--models", default=",".join(SAMPLING_MODELS), help="sampling models")
    parser.add_argument("--naive-steps", type=int, default=32, help="reference-loop steps timed")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=5, help="0 skips training figures")
    parser.add_argument(
        "--train-models",
        default=",".join(DEFAULT_TRAIN_MODELS),
        help="comma-separated; pixelcnnpp-paper (the paper's config) is a GPU row",
    )
    parser.add_argument("--precisions", default="fp32,bf16", help="training: fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--baseline-tree", default=None, help="source tree to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="baseline-tree alternations")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for every row, here and in baseline-tree workers (0: torch's default)",
    )
    parser.add_argument(
        "--baseline-jobs",
        default="train",
        help="baseline-tree: train,sample (sampling: fp32, batch 16, one sample per step)",
    )
    parser.add_argument("--profile", action="store_true", help="profile one training step")
    parser.add_argument("--out", default="bench.json", help="JSON file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.threads > 0:  # every row, not only the baseline-tree workers (passes are per thread)
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        raise ValueError(
            f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers"
        ) from None
    train_models = _names(args.train_models, list(TRAIN_MODELS), "--train-models")
    precisions = _names(args.precisions, PRECISIONS, "--precisions")
    if args.profile:
        profiles = profile_rows(
            torch.device(args.device), args.train_batch, train_models, precisions
        )
        result = {"profile": [asdict(p) for p in profiles]}
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(format_profiles(profiles))  # noqa: T201 - the command's output
        print(f"\nwrote {args.out}")  # noqa: T201
        return result
    train = TrainOptions(
        batch=args.train_batch,
        steps=args.train_steps,
        models=train_models,
        precisions=precisions,
        compile=args.compile,
        baseline_tree=args.baseline_tree,
        repeats=args.repeats,
        threads=args.threads,
        baseline_jobs=_names(args.baseline_jobs, ("train", "sample"), "--baseline-jobs"),
    )
    result = run_bench(
        args.device,
        batches,
        _names(args.models, list(SAMPLING_MODELS), "--models"),
        args.naive_steps,
        train,
    )
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(format_table(result))  # noqa: T201 - the command's output
    print(f"\nwrote {args.out}")  # noqa: T201
    return result
