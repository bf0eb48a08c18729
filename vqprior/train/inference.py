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
    content_hash,
    safe_torch_load,
)
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.sampling.noise import sampling_generator
from vqprior.train.codes import VAE_RECORD, default_device, load_vae, read_vae_record
from vqprior.train.rundir import find_export, write_json
from vqprior.uses.models import check_label

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)


def load_prior(prior_dir: str | Path) -> tuple[PixelCNN, Path]:
    path = find_export(prior_dir, "prior")
    return PixelCNN.from_pretrained(path), path


def matching_vae(prior: PixelCNN, prior_path: Path, vae_dir: str | Path | None) -> VQVAE:
    """The VAE whose codes ``prior`` models; refuse one whose hash, codebook or grid differ."""
    record = read_vae_record(prior_path)
    if record is not None and record.get("level"):  # see vqprior.train.hierarchy_infer
        raise ValueError(
            f"{prior_path} models the {record['level']} codes of a two-level VAE: pass the top "
            "prior as --prior and the bottom prior as --bottom-prior"
        )
    if vae_dir is None:
        if record is None:
            raise ValueError(f"{prior_path} is a prior on codes: pass --vae <train-vae run dir>")
        vae_dir = record["vae_path"]
    vae, vae_path = load_vae(vae_dir)
    cfg = prior.config
    if vae.config.num_codes != cfg.num_codes:
        raise CheckpointError(
            f"the VAE at {vae_path} has {vae.config.num_codes} codes but the prior models {cfg.num_codes}: "
            "pass the VAE this prior was trained on"
        )
    if record is not None:
        _, height, width = record["image_shape"]
        if vae.latent_shape(height, width) != (cfg.height, cfg.width):
            raise CheckpointError(
                f"the VAE at {vae_path} makes {vae.latent_shape(height, width)} code maps but the prior "
                f"models {(cfg.height, cfg.width)}: pass the VAE this prior was trained on"
            )
        found = content_hash(vae_path)
        if found != record["vae_hash"]:
            raise CheckpointError(
                f"the VAE at {vae_path} (hash {found}) is not the one this prior was trained on "
                f"(hash {record['vae_hash']}, {record['vae_path']}): pass that train-vae run dir"
            )
    else:
        logger.warning(
            "%s records no VAE hash: cannot check that %s is the right VAE", prior_path, vae_path
        )
    return vae


def _labels(
    prior: PixelCNN, num: int, label: int | None, device: torch.device
) -> torch.Tensor | None:
    k = prior.config.num_classes
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

    The tensors file holds ``images`` uint8 [n, c, H, W], ``codes`` long [n, h, w] (codes prior)
    and ``labels`` long [n] (conditional prior). A codes prior refuses a mismatched VAE.
    """
    if bottom_prior_dir is not None:  # two-level VAE: top prior, then bottom given top
        from vqprior.train.hierarchy_infer import generate_two_level

        if top_k is not None or top_p is not None or guidance is not None:
            raise ValueError("--top-k, --top-p and --guidance do not apply to two-level sampling")

        return generate_two_level(
            prior_dir, bottom_prior_dir, vae_dir, num, out_png, seed, temperature, label,
            device, method,
        )  # fmt: skip
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    prior, prior_path = load_prior(prior_dir)
    vae = matching_vae(prior, prior_path, vae_dir) if prior.config.data == "codes" else None
    dev = default_device(device)
    prior = prior.to(dev)
    gen = sampling_generator(seed)
    cond = _labels(prior, num, label, dev)
    samples = prior.sample(
        num,
        cond=cond,
        temperature=temperature,
        generator=gen,
        method=method,
        top_k=top_k,
        top_p=top_p,
        guidance=guidance,
    )
    images = samples if vae is None else vae.to(dev).eval().decode(samples)
    k = prior.config.num_classes
    nrow = k if (k and label is None and k <= 16) else max(1, int(math.sqrt(num)))
    out_png = Path(out_png)
    save_image_grid(out_png, images.float().cpu(), nrow=nrow)
    tensors = {"images": float_to_uint8(images.cpu()).contiguous()}
    if vae is not None:
        tensors["codes"] = samples.cpu().long().contiguous()
    if cond is not None:
        tensors["labels"] = cond.cpu().contiguous()
    raw = out_png.with_suffix(".safetensors")
    atomic_write_bytes(raw, safetensors.torch.save(tensors, metadata={"prior": str(prior_path)}))
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

    Pixel prior: exact. Two-stage model: prior bits for the codes plus the decoder's bits for
    the image given its codes (a bound; needs ``recon="mixture"``, else only the prior part).
    Writes ``eval_<split>.json`` into a run dir.
    """
    if bottom_prior_dir is not None:  # two-level VAE: the two-level bound
        from vqprior.train.hierarchy_infer import evaluate_two_level

        return evaluate_two_level(
            prior_dir, bottom_prior_dir, vae_dir, split, batch_size, device, data
        )
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    prior, prior_path = load_prior(prior_dir)
    vae = matching_vae(prior, prior_path, vae_dir) if prior.config.data == "codes" else None
    dev = default_device(device)
    prior = prior.to(dev)
    splits = load_image_splits(_run_data_config(Path(prior_dir), data))
    ds = getattr(splits, split)
    dims = splits.channels * splits.height * splits.width
    prior_nats, dec_nats, n = 0.0, 0.0, 0
    for x, y in DataLoader(ds, batch_size=batch_size):
        x, cond = x.to(dev), (y.to(dev) if prior.config.num_classes else None)
        if vae is not None:
            out = vae.to(dev).eval()(x)
            prior_nats += float(-prior.log_prob(out.codes, cond).sum())
            dec_nats += float(out.recon_loss) * dims * len(x)
        else:
            prior_nats += float(-prior.log_prob(x, cond).sum())
        n += len(x)
    if n == 0:
        raise ValueError(f"the {split} split is empty: raise data.{split}_fraction")
    result = _bits(prior_nats, dec_nats, n, dims, prior, vae)
    result.update(split=split, num_examples=n)
    if (Path(prior_dir) / "config.yaml").is_file():
        write_json(Path(prior_dir) / f"eval_{split}.json", result)
    return result


def _bits(
    prior_nats: float, dec_nats: float, n: int, dims: int, prior: PixelCNN, vae: VQVAE | None
) -> dict[str, Any]:
    if vae is None:
        return {"bits_per_dim": prior_nats / (n * dims * LN2)}
    result: dict[str, Any] = {
        "prior_bits_per_dim": prior_nats / (n * dims * LN2),
        "prior_bits_per_code": prior_nats / (n * prior.num_dims * LN2),
        "prior_bits_per_image": prior_nats / (n * LN2),
    }
    if vae.config.recon == "mixture":
        result["decoder_bits_per_dim"] = dec_nats / (n * dims * LN2)
        result["bits_per_dim"] = (prior_nats + dec_nats) / (n * dims * LN2)
        result["note"] = (
            "bits_per_dim = prior bits of the codes + decoder bits of the image (an upper bound)"
        )
    else:
        result["note"] = (
            "the VAE has recon=mse (no discrete likelihood): only the prior's part is reported"
        )
    return result


def export(ckpt: str | Path, out_dir: str | Path) -> Path:
    """A Lightning checkpoint of train-vae or train-prior -> an exported model dir (EMA weights
    for a prior, with its vae.json)."""
    return export_state(safe_torch_load(ckpt), out_dir, ckpt)


def export_state(state: Any, out_dir: str | Path, ckpt: str | Path) -> Path:
    """:func:`export` of a checkpoint already loaded (``state``) from ``ckpt``."""
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
    return out
