"""Sampling rows of ``vqprior bench``: the reference loop against the fast exact sampler.

The reference loop's cost per step is constant (every step is the same full pass), so it is
timed on a prefix of steps and extrapolated; the fast sampler always runs to completion, and
on the timed prefix both must agree exactly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.nn.step import supports_steps
from vqprior.sampling import draw_noise, num_steps, sample_naive, sampling_generator

SAMPLE_REPEATS = 3  # fast samples timed per row (each followed by three full passes)

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
    fast_s: float  # median of SAMPLE_REPEATS samples
    speedup: float
    prefix_equal: bool  # fast sample == reference on the timed prefix
    forward_s: float  # one full forward pass on ``batch`` examples (median of 9)
    passes: float  # fast_s / forward_s: the sampler's cost in full forward passes (limit: 1)


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
        # the passes ratio: samples and full passes alternate, medians of each (one sample
        # and one pass each read +-15% on a shared CPU)
        fast_ts, forward_ts = [], []
        for _ in range(SAMPLE_REPEATS):
            t, fast = _timed(lambda: model.sample(batch, generator=gen.manual_seed(1)), device)
            fast_ts.append(t)
            forward_ts += _forward_times(model, fast, device)
        fast_t, forward_t = statistics.median(fast_ts), statistics.median(forward_ts)
    assert isinstance(ref, torch.Tensor) and isinstance(fast, torch.Tensor)
    naive_total = naive_t * steps / timed
    method = "cached" if supports_steps(model.backbone) else "fixed_point"  # what auto picks
    equal = _prefix_equal(model, ref, fast, timed)
    return SamplingRow(
        name, batch, steps, timed, naive_total, method, fast_t, naive_total / fast_t, equal,
        forward_t, fast_t / forward_t,
    )  # fmt: skip


def _forward_times(model: PixelCNN, x: object, device: torch.device) -> list[float]:
    """Wall-clock of three full forward passes on the samples ``x`` (after one warm-up)."""
    assert isinstance(x, torch.Tensor)
    x = x if model.config.data == "codes" else x.to(model.param_dtype())
    model(x)
    return [_timed(lambda: model(x), device)[0] for _ in range(3)]


def _prefix_equal(model: PixelCNN, ref: torch.Tensor, fast: torch.Tensor, steps: int) -> bool:
    """Compare the first ``steps`` sequential elements (raster order) of two samples."""
    if ref.dim() == 3:
        ref, fast = ref[:, None], fast[:, None]
    groups = model.config.channel_groups
    flat_ref = ref.permute(0, 2, 3, 1).flatten(1)  # raster order: row, column, channel
    flat_fast = fast.permute(0, 2, 3, 1).flatten(1)
    elements = steps if groups > 1 else steps * ref.shape[1]
    return bool(torch.equal(flat_ref[:, :elements], flat_fast[:, :elements]))
