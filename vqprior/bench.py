"""``vqprior bench``: sampling and training speed, as ratios against baselines in the same run.

Sampling: the reference loop (one full forward pass per sequential step) against the default
fast exact sampler, for a 32x32x3 pixel prior and 8x8 / 16x16 code-map priors. The reference
loop's cost per step is constant (every step is the same full pass), so it is timed on a
prefix of steps and extrapolated; the table says how many steps were timed. The fast sampler
always runs to completion, and on the timed prefix both must agree exactly.

Training (:mod:`vqprior.bench_train`): images per second of the VQ-VAE, the default priors and
the PixelCNN++ port's tiny config, in fp32 and bf16 autocast, eager and (``--compile``)
compiled, each as a ratio to the model's fp32 eager row timed interleaved with it.
``--baseline-tree DIR`` (:mod:`vqprior.bench_ab`) times another source tree in alternating
subprocesses; ``--profile`` (:mod:`vqprior.bench_profile`) shows where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vqprior.bench_ab import compare_trees, format_ab
from vqprior.bench_profile import format_profiles, profile_rows
from vqprior.bench_train import (
    DEFAULT_TRAIN_MODELS,
    PRECISIONS,
    TRAIN_MODELS,
    format_training,
    training_rows,
)
from vqprior.io import atomic_write_text
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.nn.step import supports_steps
from vqprior.sampling import draw_noise, num_steps, sample_naive, sampling_generator

log = logging.getLogger(__name__)

# gated rows: 64 channels x 8 layers (the default before 4 layers), so rows compare across versions
SAMPLING_MODELS: dict[str, PixelCNNConfig] = {
    "pixels-32x32x3": PixelCNNConfig(
        data="pixels", in_channels=3, height=32, width=32, num_layers=8
    ),
    "codes-8x8": PixelCNNConfig(data="codes", num_codes=512, height=8, width=8, num_layers=8),
    "codes-16x16": PixelCNNConfig(data="codes", num_codes=512, height=16, width=16, num_layers=8),
    # causal attention after every 2 gated layers (issue 12): a key/value cache in the step
    "codes-16x16-attention": PixelCNNConfig(
        data="codes", num_codes=512, height=16, width=16, num_layers=8, attention_every=2
    ),
    # PixelCNN++ tiny (issue 11): its cached sampler lives in vqprior/nn/pixelcnnpp_step.py
    "pixelcnnpp-tiny-32x32x3": PixelCNNConfig(
        data="pixels",
        backbone="pixelcnnpp",
        channels=32,
        nr_resnet=1,
        num_scales=3,
        num_mixtures=5,
        dropout=0.5,
    ),
}


@dataclass
class SamplingRow:
    model: str
    batch: int
    steps: int  # sequential steps of the reference loop
    naive_steps_timed: int
    naive_s: float  # extrapolated to all steps when naive_steps_timed < steps
    fast_method: str
    fast_s: float
    speedup: float
    prefix_equal: bool  # fast sample == reference on the timed prefix


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def bench_sampling(
    name: str, cfg: PixelCNNConfig, batch: int, device: torch.device, naive_steps: int
) -> SamplingRow:
    torch.manual_seed(0)
    model = PixelCNN(cfg).to(device).eval()
    steps = num_steps(model)
    timed = min(steps, naive_steps)
    gen = sampling_generator(0)  # sampling noise is drawn on the CPU (same seed, same samples)
    with torch.no_grad():
        noise = draw_noise(model, batch, gen.manual_seed(1), device)
        sample_naive(model, batch, None, 1.0, noise, None, 2)  # warm-up both paths at this batch
        model.sample(batch, generator=gen.manual_seed(0)) if steps <= 64 else None
        naive_t, ref = _timed(
            lambda: sample_naive(model, batch, None, 1.0, noise, None, timed), device
        )
        fast_t, fast = _timed(lambda: model.sample(batch, generator=gen.manual_seed(1)), device)
    assert isinstance(ref, torch.Tensor) and isinstance(fast, torch.Tensor)
    naive_total = naive_t * steps / timed
    method = "cached" if supports_steps(model.backbone) else "fixed_point"  # what auto picks
    equal = _prefix_equal(model, ref, fast, timed)
    return SamplingRow(
        name, batch, steps, timed, naive_total, method, fast_t, naive_total / fast_t, equal
    )


def _prefix_equal(model: PixelCNN, ref: torch.Tensor, fast: torch.Tensor, steps: int) -> bool:
    """Compare the first ``steps`` sequential elements (raster order) of two samples."""
    if ref.dim() == 3:
        ref, fast = ref[:, None], fast[:, None]
    groups = model.config.channel_groups
    flat_ref = ref.permute(0, 2, 3, 1).flatten(1)  # raster order: row, column, channel
    flat_fast = fast.permute(0, 2, 3, 1).flatten(1)
    elements = steps if groups > 1 else steps * ref.shape[1]
    return bool(torch.equal(flat_ref[:, :elements], flat_fast[:, :elements]))


def format_table(result: dict) -> str:
    lines = [
        f"device: {result['device']}  torch {result['torch']}  threads {result['threads']}",
        "",
        "sampling (reference loop vs fast exact sampler)",
        f"{'model':<16}{'batch':>6}{'steps':>7}{'timed':>7}{'naive s':>11}{'fast s':>9}{'speedup':>9}  method       equal",
    ]
    for r in result["sampling"]:
        lines.append(
            f"{r['model']:<16}{r['batch']:>6}{r['steps']:>7}{r['naive_steps_timed']:>7}"
            f"{r['naive_s']:>11.2f}{r['fast_s']:>9.2f}{r['speedup']:>8.1f}x  {r['fast_method']:<12} {r['prefix_equal']}"
        )
    lines += [
        "",
        "naive times are extrapolated from the timed prefix of steps (constant cost per step)",
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
    if opts.baseline_tree:
        ab = compare_trees(
            Path(opts.baseline_tree),
            opts.models or DEFAULT_TRAIN_MODELS,
            opts.precisions,
            opts.batch,
            max(opts.steps, 1),
            opts.repeats,
            opts.threads or torch.get_num_threads(),
        )
        result["baseline"] = [asdict(r) for r in ab]
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
    parser.add_argument("--threads", type=int, default=0, help="baseline-tree worker threads")
    parser.add_argument("--profile", action="store_true", help="profile one training step")
    parser.add_argument("--out", default="bench.json", help="JSON file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(list(argv) if argv is not None else None)
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


if __name__ == "__main__":
    main()
