"""Stage configs: training settings, device options, and the YAML of each training stage.

A stage YAML has the sections ``model``, ``data`` and ``train`` (and ``vae`` for a prior).
Data-dependent model fields may be left out, ``null`` or ``auto``; they are filled in from
the data (and the VAE) and the resolved values are what ``config.yaml`` in the run dir holds:

- train-vae: ``model.in_channels`` <- the images' channels.
- train-prior on pixels (``vae: null``): ``model.in_channels``, ``model.height``,
  ``model.width`` <- the images; ``model.data`` <- ``pixels``.
- train-prior on codes (``vae: <train-vae run dir>``): ``model.num_codes`` <- the codebook
  size, ``model.height``/``model.width`` <- the code-map grid; ``model.data`` <- ``codes``.
- ``model.num_classes``: ``auto`` (or ``null``) <- the dataset's number of classes (a
  class-conditional prior); ``0`` or left out -> unconditional.

A field set to a value that contradicts the data is a ConfigError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from vqprior.config import Config, ConfigError, check_choice, check_range
from vqprior.data import DataConfig
from vqprior.models.pixelcnn import PixelCNNConfig
from vqprior.models.vqvae import VQVAEConfig

AUTO = "auto"
DEFAULT_MAX_STEPS = 10_000  # the step bound without train.max_steps and without a time budget
UNBOUNDED = 10**9  # the step bound with a time budget and no train.max_steps: the budget ends it
STAGE_SECTIONS = {"vae": ("model", "data", "train"), "prior": ("model", "data", "train", "vae")}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """Optimisation, validation, checkpointing and logging cadence of one training stage."""

    batch_size: int = 64
    lr: float = 3e-4  # priors: 3e-3, batch 8 on a CPU (32 on a GPU), cosine (train.stages)
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (its beta1 stays 0.9)
    lr_schedule: str = "constant"  # "constant" | "cosine" (decays to 0 at the step bound)
    warmup_steps: int = 0
    max_steps: int | None = None  # None: train.max_time_s bounds the run, else 10,000 steps
    max_time_s: float = (
        0.0  # > 0: stop after this many seconds of the stage (not the run's identity)
    )
    val_every_n_steps: int = 500
    val_batches: int | None = None  # None: the whole val split each time
    ckpt_every_n_steps: int = 1000
    keep_checkpoints: int = 3  # periodic step=*.ckpt files kept besides last.ckpt
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    ema_decay: float = 0.999  # Polyak averaging of the prior's weights; 0 disables
    seed: int = 0
    num_workers: int = 0
    log_every_n_steps: int = 50
    image_every_n_steps: int = 1000  # 0: only at the end
    num_sample_images: int = 64

    def __post_init__(self) -> None:
        for name in ("batch_size", "val_every_n_steps", "ckpt_every_n_steps"):
            check_range(name, getattr(self, name), 1)
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, 1)
        for name in ("warmup_steps", "keep_checkpoints", "num_workers", "image_every_n_steps"):
            check_range(name, getattr(self, name), 0)
        check_range("log_every_n_steps", self.log_every_n_steps, 1)
        check_range("num_sample_images", self.num_sample_images, 1)
        check_range("lr", self.lr, 0.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ConfigError(f"train.adam_beta2={self.adam_beta2!r} must lie in [0, 1)")
        check_range("grad_clip", self.grad_clip, 0.0)
        check_range("max_time_s", self.max_time_s, 0.0)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r} must lie in [0, 1) (0 disables)")
        if self.val_batches is not None:
            check_range("val_batches", self.val_batches, 1)

    @property
    def steps(self) -> int:
        """The step bound of this invocation, which everything that plans by steps reads (the
        Trainer, the lr schedule, validation and progress cadence): ``max_steps``, or without
        one :data:`UNBOUNDED` under a time budget (the budget ends the run and a cosine schedule
        is fitted to it) and :data:`DEFAULT_MAX_STEPS` without."""
        return recorded_steps(self.max_steps, self.max_time_s)


def recorded_steps(max_steps: Any, max_time_s: float = 0.0) -> int:
    """The step bound of a ``train.max_steps`` value as a run dir or manifest records it (None:
    unset), under a budget of ``max_time_s`` seconds (0: none); see :attr:`TrainConfig.steps`."""
    if max_steps is not None:
        return int(max_steps)
    return UNBOUNDED if max_time_s else DEFAULT_MAX_STEPS


# train keys of one invocation, not of the run: a rerun may change them freely
PER_INVOCATION = ("max_time_s",)


@dataclass(frozen=True, kw_only=True)
class VAEStageConfig(Config):
    """A resolved train-vae YAML."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True, kw_only=True)
class PriorStageConfig(Config):
    """A resolved train-prior YAML; ``vae`` is a train-vae run dir (codes) or None (pixels)."""

    model: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeviceOptions(Config):
    """Lightning device options from the command line (not part of a run's identity)."""

    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("2"), or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # None: "bf16-mixed" where bf16 is native, else "32-true"
    compile: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    def __post_init__(self) -> None:
        check_range("num_nodes", self.num_nodes, 1)

    def trainer_devices(self) -> int | str:
        return int(self.devices) if self.devices.strip().lstrip("-").isdigit() else self.devices

    def resolved_precision(self) -> str:
        """The explicit precision, else ``bf16-mixed`` where bf16 is native (a bf16-capable CUDA
        device, or a CPU with AVX512-BF16 or AMX), else ``32-true``.

        bf16 autocast keeps fp32 weights, and the heads' last 1x1 and every likelihood in
        fp32; validation and test run in fp32 (see :class:`~vqprior.train.module.StageModule`).
        """
        if self.precision:
            return self.precision
        if self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
        if self.on_cpu() and native_cpu_bf16():
            return "bf16-mixed"
        return "32-true"

    def data_device(self) -> str | None:
        """The torch device of the work around training (encoding codes, generating,
        evaluating): ``"cpu"`` when asked, else None (CUDA when available)."""
        return "cpu" if self.accelerator == "cpu" else None

    def on_cpu(self) -> bool:
        """Whether training runs on the CPU: ``cpu``, or ``auto`` with no GPU (Lightning's
        ``auto`` takes CUDA, then MPS, before the CPU). CPU-measured defaults apply there only
        (precision above, :data:`~vqprior.train.stages.PRIOR_CPU_TRAIN_DEFAULTS`)."""
        if self.accelerator != "auto":
            return self.accelerator == "cpu"
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), where bf16
    autocast roughly doubles a prior's training throughput; emulated bf16 would be slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def check_sections(raw: dict[str, Any], stage: str) -> None:
    """Reject unknown top-level sections and unknown model keys before any data is loaded."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a {stage} config must be a mapping with sections {STAGE_SECTIONS[stage]}"
        )
    allowed = STAGE_SECTIONS[stage]
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"unknown config key {key} for train-{stage}; known keys: {', '.join(allowed)}"
            )
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model must be a mapping of model fields")
    cls = VQVAEConfig if stage == "vae" else PixelCNNConfig
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key model.{unknown[0]} for {cls.__name__}; known keys: {', '.join(sorted(known))}"
        )


def is_auto(value: Any) -> bool:
    return value is None or value == AUTO


def fill_field(model: dict[str, Any], name: str, value: Any, source: str) -> None:
    """Fill ``model[name]`` when absent/null/auto; an explicit value must equal ``value``."""
    current = model.get(name, AUTO)
    if is_auto(current):
        model[name] = value
    elif current != value:
        raise ConfigError(
            f"model.{name}={current!r} does not match {source} ({value!r}): set it to auto or {value!r}"
        )


def fill_num_classes(model: dict[str, Any], num_classes: int) -> None:
    """``auto``/null -> the dataset's classes; absent -> unconditional; explicit must fit."""
    if "num_classes" not in model:
        return
    current = model["num_classes"]
    if is_auto(current):
        model["num_classes"] = num_classes
    elif current not in (0, num_classes):
        raise ConfigError(
            f"model.num_classes={current!r} but the dataset has {num_classes} classes: "
            f"use 0 (unconditional), auto or {num_classes}"
        )
