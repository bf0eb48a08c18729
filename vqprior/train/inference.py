"""Stages after training: generate, evaluate and export (no Lightning needed at run time)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch.utils.data import DataLoader

from vqprior.artifacts import save_image_grid
from vqprior.data import DataConfig, float_to_uint8, load_image_splits
from vqprior.io import (
    CheckpointError,
    atomic_write_bytes,
    safe_torch_load,
)
from vqprior.models.levels import LevelModel, LevelNats
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.sampling.noise import sampling_generator
from vqprior.train.codes import VAE_RECORD, default_device
from vqprior.train.hierarchy import plain_data
from vqprior.train.rundir import write_json
from vqprior.uses.models import check_label, load_models

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)


def _labels(k: int, num: int, label: int | None, device: torch.device) -> torch.Tensor | None:
    """``label`` for every sample, else classes 0, 1, ..., k - 1 in turn (None: unconditional)."""
    if label is not None:
        check_label(k, label)  # the one label rule of every command
        return torch.full((num,), label, dtype=torch.long, device=device)
    return torch.arange(num, device=device) % k if k else None


@torch.no_grad()
def generate(
    prior_dir: str | Path,
    vae_dir: str | Path | None = None,
    num: int = 64,
    out_png: str | Path = "samples.png",
    seed: int = 0,
    temperature: float = 1.0,
    label: int | None = None,
    device: str | None = None,
    method: str = "auto",
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Sample ``num`` images into a PNG grid, and raw samples into ``<out_png stem>.safetensors``.

    The tensors file holds ``images`` uint8 [n, c, H, W], the codes of every level (``codes``
    long [n, h, w] for a one-level VAE; ``top_codes`` and ``bottom_codes`` for two levels, whose
    top prior is ``prior_dir`` and bottom prior ``bottom_prior_dir``) and ``labels`` long [n]
    (conditional prior). Priors that do not match their VAE are refused.
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    dev = default_device(device)
    models = load_models(prior_dir, vae_dir, str(dev), bottom_prior_dir)
    model = models.model
    cond = _labels(model.num_classes, num, label, dev)
    levels = model.sample(
        num,
        cond=cond,
        temperature=temperature,
        generator=sampling_generator(seed),
        method=method,
        top_k=top_k,
        top_p=top_p,
        guidance=guidance,
    )
    images = model.decode(levels)
    k = model.num_classes
    nrow = k if (k and label is None and k <= 16) else max(1, int(math.sqrt(num)))
    out_png = Path(out_png)
    save_image_grid(out_png, images.float().cpu(), nrow=nrow)
    tensors = {"images": float_to_uint8(images.cpu()).contiguous()}
    if model.vae is not None:
        names = ["codes"] if len(levels) == 1 else [f"{n}_codes" for n in model.names]
        tensors.update({n: c.cpu().long().contiguous() for n, c in zip(names, levels, strict=True)})
    if cond is not None:
        tensors["labels"] = cond.cpu().contiguous()
    raw = out_png.with_suffix(".safetensors")
    meta = {"prior": str(models.prior_path)}
    if bottom_prior_dir is not None:
        meta["bottom_prior"] = str(models.prior_paths[-1])
    atomic_write_bytes(raw, safetensors.torch.save(tensors, metadata=meta))
    return {"png": str(out_png), "tensors": str(raw), "num": num}


def _run_data_config(prior_dir: Path, data: DataConfig | None) -> DataConfig:
    if data is not None:
        return data
    cfg_file = prior_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: pass a train-prior run dir to evaluate")
    return DataConfig.from_dict(
        (yaml.safe_load(cfg_file.read_text()) or {}).get("data"), prefix="data."
    )


@torch.no_grad()
def evaluate(
    prior_dir: str | Path,
    vae_dir: str | Path | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str | None = None,
    data: DataConfig | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Negative log-likelihood of a split in bits per dimension (of the images).

    Pixel prior: exact. A VAE and its priors: every level's prior bits (each given the levels
    above) plus the decoder's bits for the image given its codes (a bound; needs
    ``recon="mixture"``, else only the priors' part). Writes ``eval_<split>.json`` into the
    (bottom) prior's run dir.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    dev = default_device(device)
    models = load_models(prior_dir, vae_dir, str(dev), bottom_prior_dir)
    model, run_dir = models.model, Path(bottom_prior_dir or prior_dir)
    splits = load_image_splits(plain_data(_run_data_config(run_dir, data)))
    parts: list[LevelNats] = []
    for x, y in DataLoader(getattr(splits, split), batch_size=batch_size):
        parts.append(model.nats(x.to(dev), y.to(dev) if model.num_classes else None))
    if not parts:
        raise ValueError(f"the {split} split is empty: raise data.{split}_fraction")
    levels = [torch.cat([p.levels[i] for p in parts]).cpu() for i in range(len(model.priors))]
    nats = LevelNats(tuple(levels), torch.cat([p.decoder for p in parts]).cpu())
    dims = splits.channels * splits.height * splits.width
    result = _bits(nats, dims, model)
    result.update(split=split, num_examples=len(nats.decoder))
    if (run_dir / "config.yaml").is_file():
        write_json(run_dir / f"eval_{split}.json", result)
    return result


def _bits(nats: LevelNats, dims: int, model: LevelModel) -> dict[str, Any]:
    """The figures of :func:`evaluate`: bits per dimension in total and per part."""
    n = len(nats.decoder)
    if model.vae is None:
        return {"bits_per_dim": float(nats.levels[0].sum()) / (n * dims * LN2)}
    names = ["prior"] if len(model.priors) == 1 else list(model.names)
    result: dict[str, Any] = nats.bits_per_dim(dims, names)
    for name, part, prior in zip(names, nats.levels, model.priors, strict=True):
        result[f"{name}_bits_per_code"] = float(part.sum()) / (n * prior.num_dims * LN2)
        result[f"{name}_bits_per_image"] = float(part.sum()) / (n * LN2)
    if model.vae.config.recon == "mixture":
        result["note"] = (
            "bits_per_dim = prior bits of every level's codes + decoder bits of the image "
            "(an upper bound)"
        )
    else:
        for key in ("decoder_bits_per_dim", "bits_per_dim"):
            result.pop(key)
        result["note"] = (
            "the VAE has recon=mse (no discrete likelihood): only the priors' part is reported"
        )
    return result


def export(ckpt: str | Path, out_dir: str | Path, onnx: bool = False) -> Path:
    """A Lightning checkpoint of train-vae or train-prior -> an exported model dir (EMA weights
    for a prior, with its vae.json). ``onnx``: also its ONNX graphs and ``onnx.json``
    (:mod:`vqprior.onnx_export`); ``ckpt`` may then be an exported model dir, whose graphs
    alone go to ``out_dir`` (which may be that dir)."""
    if Path(ckpt).is_dir():
        if not onnx:
            raise ValueError(
                f"{ckpt} is a directory: export takes a .ckpt (or a model dir with --onnx)"
            )
        from vqprior.io import load_pretrained
        from vqprior.onnx_export import export_onnx, require_onnx

        require_onnx()
        model = load_pretrained(ckpt)
        assert isinstance(model, (VQVAE, PixelCNN))
        export_onnx(model, out_dir)
        return Path(out_dir)
    return export_state(safe_torch_load(ckpt), out_dir, ckpt, onnx)


def export_state(state: Any, out_dir: str | Path, ckpt: str | Path, onnx: bool = False) -> Path:
    """:func:`export` of a checkpoint already loaded (``state``) from ``ckpt``."""
    if onnx:
        from vqprior.onnx_export import require_onnx

        require_onnx()  # before writing anything
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    if (
        not isinstance(hp, dict)
        or hp.get("kind") not in ("vae", "prior")
        or "state_dict" not in state
    ):
        raise CheckpointError(
            f"{ckpt} is not a vqprior training checkpoint (no kind/model hyperparameters)"
        )
    weights: dict[str, torch.Tensor] = state["state_dict"]
    model: VQVAE | PixelCNN
    if hp["kind"] == "vae":
        model, prefix = VQVAE(VQVAEConfig.from_dict(hp["model"])), "model."
    else:
        model = PixelCNN(PixelCNNConfig.from_dict(hp["model"]))
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in weights) else "model."
    own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match its config (missing {sorted(missing)[:3]})"
        )
    out = Path(out_dir)
    record = hp.get("vae") if hp["kind"] == "prior" else None
    extra_files = {VAE_RECORD: json.dumps(record, indent=2) + "\n"} if record else None
    model.save_pretrained(out, extra_files=extra_files)
    if onnx:
        from vqprior.onnx_export import export_onnx

        export_onnx(model, out)
    return out
