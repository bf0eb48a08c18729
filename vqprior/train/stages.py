"""Training stages as library functions (no click): train_vae and train_prior.

Run directory of a stage::

    config.yaml              the resolved config (a rerun with the same config resumes)
    checkpoints/last.ckpt    full training state (+ periodic step=*.ckpt)
    model/                   the exported model (config.json + model.safetensors + README.md card;
                             vae.json for codes)
    metrics.csv              one row per logged step
    images/*.png             reconstruction or sample grids
    summary.json             key figures at the end
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vqprior.config import apply_overrides
from vqprior.data import DataConfig, ImageSplits, load_image_splits
from vqprior.io import safe_torch_load
from vqprior.lock import RunLock
from vqprior.models.vqvae import VQVAE
from vqprior.sampling.noise import sampling_generator
from vqprior.train.callbacks import ImageGrids
from vqprior.train.checkpoints import VAL_METRIC, best_checkpoint
from vqprior.train.codes import VAE_RECORD, check_vae_channels, load_vae, vae_record
from vqprior.train.config import (
    DeviceOptions,
    PriorStageConfig,
    TrainConfig,
    VAEStageConfig,
    check_sections,
    fill_field,
    fill_num_classes,
)
from vqprior.train.datamodule import image_datamodule
from vqprior.train.hierarchy import check_vae_data, refuse_level, resolve_level
from vqprior.train.hierarchy_prior import _bottom_grid, grid_nrow, level_prior_parts
from vqprior.train.inference import export_state
from vqprior.train.prior import PriorModule
from vqprior.train.rundir import (
    IMAGES_DIR,
    MODEL_DIR,
    check_run_dir,
    prepare_run_dir,
    read_json,
    recorded_data,
    recorded_train,
    write_json,
    write_model_card,
)
from vqprior.train.trainer import build_trainer, run_training
from vqprior.train.vae import VQVAEModule

logger = logging.getLogger(__name__)


def _with_seed(cfg_dict: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return apply_overrides(cfg_dict, [f"train.seed={seed}"]) if seed is not None else dict(cfg_dict)


def _with_train_defaults(
    raw: dict[str, Any], out: Path | None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``raw`` with its train keys over those the run dir ``out`` records (a rerun: see
    :func:`~vqprior.train.rundir.recorded_train`), over the stage's ``defaults``."""
    train = {**(defaults or {}), **recorded_train(out), **(raw.get("train") or {})}
    return {**raw, "train": train}


def resolve_vae_stage(
    raw: dict[str, Any], out: Path | None = None
) -> tuple[VAEStageConfig, ImageSplits]:
    """Check keys, load the data, fill ``model.in_channels``; the resolved config and splits.
    Train keys ``raw`` does not name keep the values the run dir ``out`` records
    (:func:`~vqprior.train.rundir.recorded_train`)."""
    check_sections(raw, "vae")
    raw = _with_train_defaults(raw, out)
    data = DataConfig.from_dict(raw.get("data"), prefix="data.")
    check_vae_data(data)  # data.level belongs to a prior
    TrainConfig.from_dict(raw.get("train"), prefix="train.")  # fail fast, before loading data
    splits = load_image_splits(data, codes=raw.get("vae") is not None)
    model = dict(raw.get("model") or {})
    fill_field(model, "in_channels", splits.channels, "the images' channels")
    cfg = VAEStageConfig.from_dict({**raw, "model": model})
    VQVAE(cfg.model).latent_shape(splits.height, splits.width)  # image size fits the downsampling
    return cfg, splits


def _finish(
    out: Path,
    stage: str,
    trainer: L.Trainer,
    model: torch.nn.Module,
    metrics: dict[str, float],
    started: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    old = out / "summary.json"
    if old.is_file():  # a resumed run keeps the figures that the new launch did not log again
        metrics = {**read_json(old).get("metrics", {}), **metrics}
    summary = {
        "stage": stage,
        "global_step": trainer.global_step,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(time.time() - started, 2),
        "precision": str(trainer.precision),
        "metrics": {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)},
        "model_dir": str(out / MODEL_DIR),
        **extra,
    }
    write_json(out / "summary.json", summary)
    write_model_card(out, summary)  # model/README.md: the export's card, with these figures
    return summary


def train_vae(
    cfg_dict: dict[str, Any],
    out_dir: str | Path,
    device: DeviceOptions | None = None,
    seed: int | None = None,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Stage one: fit a VQ-VAE; rerunning with the same config resumes. Returns the summary."""
    started, device, out = time.time(), device or DeviceOptions(), Path(out_dir)
    cfg, splits = resolve_vae_stage(_with_seed(cfg_dict, seed), out)
    check_run_dir(out, cfg.to_dict())  # before the lock: refused dirs get no .lock file
    with RunLock(out):
        return _fit_vae(cfg, splits, out, device, callbacks, started)


def _fit_vae(
    cfg: VAEStageConfig,
    splits: ImageSplits,
    out: Path,
    device: DeviceOptions,
    callbacks: list[Callback] | None,
    started: float,
) -> dict[str, Any]:
    resume = prepare_run_dir(out, cfg.to_dict())
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = VQVAEModule(cfg.model.to_dict(), cfg.train.to_dict(), compile=device.compile)
    has_val = len(splits.val) > 0  # type: ignore[arg-type]
    fixed = _fixed_images(splits, min(cfg.train.num_sample_images, 32))
    grids = ImageGrids(
        out / IMAGES_DIR, "recon", _reconstructor(fixed), cfg.train.image_every_n_steps
    )
    trainer = build_trainer(out, cfg.train, device, [grids, *(callbacks or [])], has_val, started)
    dm = image_datamodule(splits, cfg.train.batch_size, cfg.train.num_workers, cfg.train.seed)
    metrics = run_training(trainer, module, dm, resume, out, has_val)
    if not trainer.is_global_zero:
        return {}
    chosen = export_best(
        trainer, metrics, out, lambda: module.model.save_pretrained(out / MODEL_DIR)
    )
    shape = {"image_shape": [splits.channels, splits.height, splits.width]}  # for the card
    return _finish(out, "train-vae", trainer, module.model, metrics, started, {**chosen, **shape})


def export_best(
    trainer: L.Trainer, metrics: dict[str, float], out: Path, save_final: Callable[[], Any]
) -> dict[str, Any]:
    """Export the weights with the lowest ``val/loss``: ``best.ckpt``'s when they beat the
    final weights' (validated at the end, once), else the final weights (``save_final``).
    Returns what the summary records: which weights, their step and val loss."""
    found, final = best_checkpoint(trainer), metrics.get(VAL_METRIC)
    if found is not None and (final is None or found[1] < final):
        state = safe_torch_load(found[0])
        export_state(state, out / MODEL_DIR, found[0])
        step = int(state.get("global_step", -1))
        return {"exported": "best", "best_step": step, "best_val_loss": found[1]}
    save_final()
    chosen: dict[str, Any] = {"exported": "final", "best_step": trainer.global_step}
    if final is not None:
        chosen["best_val_loss"] = final
    return chosen


def _reconstructor(fixed: torch.Tensor) -> Any:
    def make(module: VQVAEModule) -> tuple[torch.Tensor, int]:
        return module.reconstruction_grid(fixed)

    return make


def _fixed_images(splits: ImageSplits, n: int) -> torch.Tensor:
    """The first ``n`` val images (train when val is empty): [n, c, H, W]."""
    ds = splits.val if len(splits.val) > 0 else splits.train  # type: ignore[arg-type]
    n = min(n, len(ds))  # type: ignore[arg-type]
    return torch.stack([ds[i][0] for i in range(n)])


# A prior's own training defaults over TrainConfig's (which the VAE keeps): lr 1e-3 reached
# lower held-out bits/dim per second than 3e-4 on CIFAR-10 and MNIST (README, Training speed).
# chosen per second of training against the PixelCNN++ port (docs/benchmarks.md): a prior
# learns most per second with small batches, a high lr and a cosine schedule (fitted to
# train.max_time_s when that is set), without an EMA
PRIOR_TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "batch_size": 32,
    "lr_schedule": "cosine",
    "warmup_steps": 50,
    "ema_decay": 0.0,  # the cosine decay already averages; an EMA lags it (+0.01 bits/dim)
    # AdamW's beta2 0.999 -> 0.95, at batch 8 on a CPU, held out: CIFAR-10 pixels 300 s 3.89 and
    # 3.88 bits/dim against 4.13 and 4.02 (two seeds), 900 s 3.62 against 3.70; MNIST 900 s
    # 1.089-1.091 (three seeds) against 1.106-1.226, where 0.999's loss sometimes jumped at the
    # peak lr and stayed up; 8x8 codes level (docs/benchmarks.md, "Adam's beta2")
    "adam_beta2": 0.95,
}

# A prior's training defaults over those when it trains on a CPU: batch 8. There a step costs a
# quarter to a third of batch 32's (the images/s hardly change), so it makes 3-4x the updates,
# and in minutes updates count more than gradient noise: CIFAR-10 pixels, 300 s, 4.31 held-out
# bits/dim against 5.10 at batch 32 (fp32), 3.89 against 4.15 (bf16); 900 s, 3.60 against the
# port's 4.16; codes 8x8, 300 s, 7.60 bits/code against 7.76 (docs/benchmarks.md). On a GPU a
# small step costs about the same at any batch, so batch 32 stays there (not measured).
PRIOR_CPU_TRAIN_DEFAULTS: dict[str, Any] = {"batch_size": 8}

# A codes prior's training defaults over PRIOR_TRAIN_DEFAULTS: lr 1e-3. Its steps cost ~1/8 of a
# pixel prior's, so a budget holds 5-10x the steps, and over that many the peak lr of 3e-3 ends
# worse: MNIST 7x7 codes (54,000 maps), held out, 300 s 3.099 bits/code against 3.159, 900 s
# 2.951 and 2.942 against 3.199 and 3.203 (two seeds); on 1,600 CIFAR-10 maps, which overfit
# after ~1,000 steps, 3e-3 stays 0.05 ahead (docs/benchmarks.md, "A codes prior's lr").
CODES_PRIOR_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3}


# A pixel prior's default model, when its config names no backbone nor any field of one: the
# PixelCNN++ architecture at the port's tiny size (32 filters, 1 block per scale, 3 scales,
# dropout 0.5). Trained with the defaults above for 300 or 900 s on CIFAR-10 it reached 0.09-0.25
# lower held-out bits/dim than the gated 64 x 4, and 0.29-0.48 lower than the port itself
# (docs/benchmarks.md). Images whose sides are not multiples of 4 (the 3 scales) keep the gated
# backbone.
PIXEL_PRIOR_MODEL_DEFAULTS: dict[str, Any] = {
    "backbone": "pixelcnnpp",
    "channels": 32,
    "nr_resnet": 1,
    "num_scales": 3,
    "dropout": 0.5,
}
_NAMES_AN_ARCHITECTURE = (
    "backbone",
    "head",
    "num_layers",
    "kernel_size",
    "attention_every",
    "attention_heads",
    "spatial_cond_channels",
)


def pixel_prior_model(model: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """``model`` over :data:`PIXEL_PRIOR_MODEL_DEFAULTS` when it names no architecture and the
    image sides allow PixelCNN++'s scales; else as it is (the gated backbone by default)."""
    factor = 2 ** (PIXEL_PRIOR_MODEL_DEFAULTS["num_scales"] - 1)
    if any(k in model for k in _NAMES_AN_ARCHITECTURE) or height % factor or width % factor:
        return model
    return {**PIXEL_PRIOR_MODEL_DEFAULTS, **model}


def prior_train_defaults(device: DeviceOptions, codes: bool = False) -> dict[str, Any]:
    """A prior's training defaults: :data:`PRIOR_TRAIN_DEFAULTS`, for a codes prior under
    :data:`CODES_PRIOR_TRAIN_DEFAULTS`, on the CPU under :data:`PRIOR_CPU_TRAIN_DEFAULTS`."""
    return {
        **PRIOR_TRAIN_DEFAULTS,
        **(CODES_PRIOR_TRAIN_DEFAULTS if codes else {}),
        **(PRIOR_CPU_TRAIN_DEFAULTS if device.on_cpu() else {}),
    }


def resolve_prior_stage(
    raw: dict[str, Any], device: DeviceOptions | None = None, out: Path | None = None
) -> tuple[PriorStageConfig, ImageSplits, VQVAE | None, dict[str, Any] | None]:
    """Check keys, load data (and the VAE), fill the data-dependent model fields; the training
    defaults are those of ``device`` (:func:`prior_train_defaults`), under the values the run
    dir ``out`` records (:func:`~vqprior.train.rundir.recorded_train`) for a rerun."""
    check_sections(raw, "prior")
    codes = raw.get("vae") is not None
    if codes:  # the VAE's data, but for the keys the prior names
        raw = {**raw, "data": recorded_data(raw["vae"], raw.get("data"))}
    data = DataConfig.from_dict(raw.get("data"), prefix="data.")
    raw = _with_train_defaults(raw, out, prior_train_defaults(device or DeviceOptions(), codes))
    TrainConfig.from_dict(raw.get("train"), prefix="train.")
    splits = load_image_splits(data, codes=codes)
    model = dict(raw.get("model") or {})
    vae, record = None, None
    if codes:
        vae, export = load_vae(str(raw["vae"]))
        check_vae_channels(vae, splits)
        record = vae_record(vae, export, (splits.channels, splits.height, splits.width))
        record = resolve_level(model, vae, record, data)  # the prior's level: its grid
        fill_field(model, "data", "codes", "vae (set: a prior on codes)")
        fill_field(model, "num_codes", record["num_codes"], "the VAE's codebook size")
        fill_field(model, "height", record["grid"][0], "the VAE's code-map height")
        fill_field(model, "width", record["grid"][1], "the VAE's code-map width")
    else:
        refuse_level(data)  # data.level: a prior on a VAE's codes only
        fill_field(model, "data", "pixels", "vae (null: a prior on pixels)")
        fill_field(model, "in_channels", splits.channels, "the images' channels")
        fill_field(model, "height", splits.height, "the image height")
        fill_field(model, "width", splits.width, "the image width")
        model = pixel_prior_model(model, splits.height, splits.width)
    fill_num_classes(model, splits.num_classes)
    return PriorStageConfig.from_dict({**raw, "model": model}), splits, vae, record


def train_prior(
    cfg_dict: dict[str, Any],
    out_dir: str | Path,
    device: DeviceOptions | None = None,
    seed: int | None = None,
    codes_dir: str | Path | None = None,
    callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Stage two: fit a PixelCNN on the VAE's codes (``vae`` set) or on pixels. Returns the summary.

    Codes come from ``codes_dir`` (refused unless encoded by this VAE from this data), else
    from ``<out>/codes`` when still valid, else they are encoded now.
    """
    started, device, out = time.time(), device or DeviceOptions(), Path(out_dir)
    cfg, splits, vae, record = resolve_prior_stage(_with_seed(cfg_dict, seed), device, out)
    check_run_dir(out, cfg.to_dict())
    with RunLock(out):
        codes = Path(codes_dir) if codes_dir else None
        return _fit_prior(cfg, splits, vae, record, out, device, codes, callbacks, started)


def _fit_prior(
    cfg: PriorStageConfig,
    splits: ImageSplits,
    vae: VQVAE | None,
    record: dict[str, Any] | None,
    out: Path,
    device: DeviceOptions,
    codes_dir: Path | None,
    callbacks: list[Callback] | None,
    started: float,
) -> dict[str, Any]:
    resume = prepare_run_dir(out, cfg.to_dict())
    _check_vae_unchanged(out, record)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if vae is not None and record is not None:  # a prior on one level of the VAE's codes
        dm, has_val, module, make_grid = level_prior_parts(
            cfg, splits, vae, record, out, codes_dir, device
        )
    else:
        dm = image_datamodule(splits, cfg.train.batch_size, cfg.train.num_workers, cfg.train.seed)
        has_val = len(splits.val) > 0  # type: ignore[arg-type]
        module = PriorModule(cfg.model.to_dict(), cfg.train.to_dict(), compile=device.compile)
        make_grid = _sampler(cfg, None)
    grids = ImageGrids(out / IMAGES_DIR, "samples", make_grid, cfg.train.image_every_n_steps)
    trainer = build_trainer(out, cfg.train, device, [grids, *(callbacks or [])], has_val, started)
    metrics = run_training(trainer, module, dm, resume, out, has_val)
    if not trainer.is_global_zero:
        return {}
    extra_files = {VAE_RECORD: json.dumps(record, indent=2) + "\n"} if record is not None else None
    chosen = export_best(
        trainer,
        metrics,
        out,
        lambda: module.eval_model.save_pretrained(out / MODEL_DIR, extra_files=extra_files),
    )
    extra = {"vae_hash": record["vae_hash"]} if record else {}
    return _finish(
        out, "train-prior", trainer, module.eval_model, metrics, started, {**chosen, **extra}
    )


def _check_vae_unchanged(out: Path, record: dict[str, Any] | None) -> None:
    """Record the VAE in ``<out>/vae.json``; a resumed run must see the same VAE."""
    if record is None:
        return
    path = out / VAE_RECORD
    if path.is_file():
        old = read_json(path).get("vae_hash")
        if old != record["vae_hash"]:
            raise ValueError(
                f"{out} was trained on codes of VAE {old} but {record['vae_path']} is now "
                f"{record['vae_hash']}: use another --out for the new VAE"
            )
    else:
        write_json(path, record)


def _sampler(cfg: PriorStageConfig, vae: VQVAE | None) -> Any:
    """The image-grid function of a prior: EMA samples (decoded through the VAE for codes)."""
    n = cfg.train.num_sample_images
    nrow = grid_nrow(n, cfg.model.num_classes)
    if vae is not None:
        return _bottom_grid(vae, n, nrow)

    def make(module: PriorModule) -> tuple[torch.Tensor, int]:
        return module.sample(n, generator=sampling_generator(cfg.train.seed)), nrow

    return make
