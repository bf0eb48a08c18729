"""``vqprior bench``: sampling and training speed, as ratios against baselines in the same run.

Sampling: the reference loop (one full forward pass per sequential step) against the default
fast exact sampler, for a 32x32x3 pixel prior and 8x8 / 16x16 code-map priors. The reference
loop's cost per step is constant (every step is the same full pass), so it is timed on a
prefix of steps and extrapolated; the table says how many steps were timed. The fast sampler
always runs to completion, and on the timed prefix both must agree exactly.

Training: images per second and peak memory for one optimiser step of the VQ-VAE and both
priors (bf16 autocast on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from vqprior.io import atomic_write_text
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.sampling import draw_noise, num_steps, sample_naive

log = logging.getLogger(__name__)

SAMPLING_MODELS: dict[str, PixelCNNConfig] = {
    "pixels-32x32x3": PixelCNNConfig(data="pixels", in_channels=3, height=32, width=32),
    "codes-8x8": PixelCNNConfig(data="codes", num_codes=512, height=8, width=8),
    "codes-16x16": PixelCNNConfig(data="codes", num_codes=512, height=16, width=16),
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


@dataclass
class TrainingRow:
    model: str
    batch: int
    images_per_s: float
    peak_memory_mib: float
    memory_kind: str


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
    gen = torch.Generator()  # sampling noise is drawn on the CPU (same seed, same samples)
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
    method = "cached" if cfg.backbone == "gated" else "fixed_point"
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


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    # ru_maxrss is KiB on Linux; a process-wide high-water mark, so it only ever grows
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def bench_training(
    name: str,
    model: torch.nn.Module,
    batch_fn: Callable[[], tuple],
    loss_fn: Callable[..., torch.Tensor],
    batch: int,
    device: torch.device,
    steps: int,
) -> TrainingRow:
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        args = batch_fn()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(*args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run() -> None:
        for _ in range(steps):
            step()

    step()  # warm-up
    elapsed, _ = _timed(run, device)
    mem, kind = _peak_memory(device)
    return TrainingRow(name, batch, batch * steps / elapsed, mem, kind)


def training_rows(device: torch.device, batch: int, steps: int) -> list[TrainingRow]:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    codes = torch.randint(512, (batch, 8, 8), device=device)
    vae = VQVAE(VQVAEConfig(in_channels=3))
    pix = PixelCNN(SAMPLING_MODELS["pixels-32x32x3"])
    cod = PixelCNN(SAMPLING_MODELS["codes-8x8"])
    return [
        bench_training(
            "vqvae-32x32x3", vae, lambda: (images,), lambda x: vae(x).loss, batch, device, steps
        ),
        bench_training(
            "prior-codes-8x8",
            cod,
            lambda: (codes,),
            lambda c: -cod.log_prob(c, reduction="mean"),
            batch,
            device,
            steps,
        ),
        bench_training(
            "prior-pixels-32x32x3",
            pix,
            lambda: (images,),
            lambda x: -pix.log_prob(x, reduction="mean"),
            batch,
            device,
            steps,
        ),
    ]


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
        "",
        "training (one optimiser step per batch)",
        f"{'model':<22}{'batch':>6}{'images/s':>11}{'peak MiB':>10}  memory",
    ]
    for r in result["training"]:
        lines.append(
            f"{r['model']:<22}{r['batch']:>6}{r['images_per_s']:>11.1f}{r['peak_memory_mib']:>10.0f}  {r['memory_kind']}"
        )
    return "\n".join(lines)


def run_bench(
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1, 16, 64),
    models: Sequence[str] | None = None,
    naive_steps: int = 32,
    train_batch: int = 32,
    train_steps: int = 5,
) -> dict:
    dev = torch.device(device)
    rows = []
    for name in models or list(SAMPLING_MODELS):
        if name not in SAMPLING_MODELS:
            raise ValueError(f"unknown bench model {name!r}; choose from {sorted(SAMPLING_MODELS)}")
        for batch in batch_sizes:
            log.info("sampling %s batch %d", name, batch)
            rows.append(
                asdict(bench_sampling(name, SAMPLING_MODELS[name], batch, dev, naive_steps))
            )
    train = [asdict(r) for r in training_rows(dev, train_batch, train_steps)] if train_steps else []
    return {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "sampling": rows,
        "training": train,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="vqprior bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    parser.add_argument("--models", default=",".join(SAMPLING_MODELS), help="comma-separated")
    parser.add_argument("--naive-steps", type=int, default=32, help="reference-loop steps timed")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=5, help="0 skips training figures")
    parser.add_argument("--out", default="bench.json", help="JSON file to write")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        raise ValueError(
            f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers"
        ) from None
    result = run_bench(
        args.device,
        batches,
        [m for m in args.models.split(",") if m],
        args.naive_steps,
        args.train_batch,
        args.train_steps,
    )
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(format_table(result))  # noqa: T201 - the command's output
    print(f"\nwrote {args.out}")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
