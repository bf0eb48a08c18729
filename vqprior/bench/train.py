"""Training throughput for ``vqprior bench``: variants timed round-robin, ratios to a baseline.

Every model is trained (Adam, one optimiser step per batch) in each variant: precision fp32
or bf16 autocast (the likelihoods stay fp32), eager or ``torch.compile``, in the memory
format training uses (:func:`~vqprior.nn.layout.trains_channels_last`). Variants of one
model are interleaved step by step in one process and the median step time is kept, so each
ratio to the model's fp32 eager row is measured under the same machine load.
:mod:`vqprior.bench.ab` compares against another source tree (NCHW fp32 in both trees).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vqprior.host import keep_freed_memory
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.nn.layout import trains_channels_last

# name -> (kind, config kwargs); "pixelcnnpp-tiny" is the pixel-cnn-pp port's smallest setting;
# the gated rows pin 64 x 8 (the earlier default) so that --baseline-tree compares like with like
TRAIN_MODELS: dict[str, tuple[str, dict]] = {
    "vqvae-32x32x3": ("vqvae", {"in_channels": 3}),
    "prior-codes-8x8": (
        "prior",
        {"data": "codes", "num_codes": 512, "height": 8, "width": 8, "num_layers": 8},
    ),
    "prior-pixels-32x32x3": ("prior", {"data": "pixels", "in_channels": 3, "num_layers": 8}),
    "prior-pixels-default": ("prior", {"data": "pixels", "in_channels": 3}),  # this version's
    "pixelcnnpp-tiny": (
        "prior",
        {"backbone": "pixelcnnpp", "channels": 32, "nr_resnet": 1, "num_mixtures": 5},
    ),
    # the PixelCNN++ paper's CIFAR-10 config (160 filters, 5 blocks per scale, 10 mixtures,
    # dropout 0.5): a GPU row, not in the default list (--train-models pixelcnnpp-paper)
    "pixelcnnpp-paper": (
        "prior",
        {
            "backbone": "pixelcnnpp",
            "channels": 160,
            "nr_resnet": 5,
            "num_mixtures": 10,
            "dropout": 0.5,
        },
    ),
}
GPU_ONLY = ("pixelcnnpp-paper",)
DEFAULT_TRAIN_MODELS = [name for name in TRAIN_MODELS if name not in GPU_ONLY]
TINY_DROPOUT = 0.5  # the port's tiny config trains with dropout 0.5
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class Variant:
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    compiled: bool = False

    @property
    def label(self) -> str:
        return f"{self.precision} {'compiled' if self.compiled else 'eager'}"


@dataclass
class TrainingRow:
    model: str
    precision: str
    mode: str  # eager | compiled
    channels_last: bool
    batch: int
    images_per_s: float
    ratio: float  # to this model's first variant (fp32 eager), timed interleaved
    peak_memory_mib: float
    memory_kind: str


def build_model(name: str) -> nn.Module:
    """A fresh model for a :data:`TRAIN_MODELS` entry (seeded)."""
    if name not in TRAIN_MODELS:
        raise ValueError(f"unknown training model {name!r}; choose from {sorted(TRAIN_MODELS)}")
    kind, kwargs = TRAIN_MODELS[name]
    torch.manual_seed(0)
    if kind == "vqvae":
        return VQVAE(VQVAEConfig(**kwargs))
    if name == "pixelcnnpp-tiny":
        kwargs = {**kwargs, "dropout": TINY_DROPOUT}
    return PixelCNN(PixelCNNConfig(**kwargs))


def example_batch(model: nn.Module, batch: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    if isinstance(model, PixelCNN) and model.config.data == "codes":
        cfg = model.config
        shape = (batch, cfg.height, cfg.width)
        return torch.randint(cfg.num_codes, shape, generator=gen).to(device)
    return (torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)


def loss_function(model: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor]:
    """The training loss as the training modules compute it (``log_prob`` or the VAE forward)."""
    if isinstance(model, PixelCNN):
        log_prob = torch.compile(model.log_prob) if compiled else model.log_prob
        return lambda x: -log_prob(x, reduction="mean")
    forward = torch.compile(model) if compiled else model
    return lambda x: forward(x).loss


def channels_last(name: str, variant: Variant, device: torch.device) -> bool:
    """Whether training (and so this variant's row) runs in channels-last memory."""
    precision = "bf16-mixed" if variant.precision == "bf16" else "32-true"
    return trains_channels_last(device.type, precision, TRAIN_MODELS[name][0] == "prior")


def make_step(
    name: str, variant: Variant, batch: int, device: torch.device, labels: bool = False
) -> Callable[[], None]:
    """One closure per variant: a fresh model, its optimiser, and one training step (with
    freed host memory kept for reuse, as the training commands run)."""
    keep_freed_memory()
    model = build_model(name).to(device).train()
    x = example_batch(model, batch, device)
    if channels_last(name, variant, device):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    loss_fn = loss_function(model, variant.compiled)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    bf16 = variant.precision == "bf16"

    def phase(label: str) -> torch.autograd.profiler.record_function:
        return torch.autograd.profiler.record_function(label if labels else "")

    def step() -> None:
        with phase("phase: forward"), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = loss_fn(x)
        with phase("phase: backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("phase: optimizer"):
            opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    steps: Sequence[Callable[[], None]], repeats: int, device: torch.device
) -> list[float]:
    """Median seconds per call of each step, calling them round-robin ``repeats`` times."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    # ru_maxrss is KiB on Linux; a process-wide high-water mark, so it only ever grows
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def variants(precisions: Sequence[str], compile_too: bool) -> list[Variant]:
    """fp32 eager first (the baseline row), then the others."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    modes = (False, True) if compile_too else (False,)
    found = [Variant(precision=p, compiled=c) for c in modes for p in ("fp32", *precisions)]
    return list(dict.fromkeys(found))


def bench_model(
    name: str, chosen: Sequence[Variant], batch: int, device: torch.device, steps: int
) -> list[TrainingRow]:
    """Rows for every variant of one model, the first being the ratio baseline."""
    closures = [make_step(name, v, batch, device) for v in chosen]
    for step in closures:  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    medians = interleaved_medians(closures, steps, device)
    mem, kind = _peak_memory(device)
    return [
        TrainingRow(
            name,
            v.precision,
            "compiled" if v.compiled else "eager",
            channels_last(name, v, device),
            batch,
            batch / t,
            medians[0] / t,
            mem,
            kind,
        )
        for v, t in zip(chosen, medians, strict=True)
    ]


def training_rows(
    device: torch.device,
    batch: int,
    steps: int,
    models: Sequence[str] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    compile_too: bool = False,
) -> list[TrainingRow]:
    chosen = variants(precisions, compile_too)
    rows: list[TrainingRow] = []
    for name in models or DEFAULT_TRAIN_MODELS:
        rows += bench_model(name, chosen, batch, device, steps)
    return rows


def format_training(rows: Sequence[dict]) -> list[str]:
    lines = [
        "training (one optimiser step per batch; ratio to the model's fp32 eager row, "
        "interleaved, median step)",
        f"{'model':<22}{'variant':<15}{'batch':>6}{'images/s':>10}{'ratio':>8}{'peak MiB':>10}",
    ]
    for r in rows:
        variant = f"{r['precision']} {r['mode']}{' cl' if r['channels_last'] else ''}"
        lines.append(
            f"{r['model']:<22}{variant:<15}{r['batch']:>6}{r['images_per_s']:>10.1f}"
            f"{r['ratio']:>7.2f}x{r['peak_memory_mib']:>10.0f}"
        )
    return lines
