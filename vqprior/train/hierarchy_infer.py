"""generate and evaluate for a two-level VQ-VAE: a top prior and a bottom prior (no Lightning).

``generate`` samples the top codes, then the bottom codes given them (the spatial condition
:func:`vqprior.models.hierarchy.top_condition`), then decodes both levels. ``evaluate``
reports the two-level bound, in bits per image dimension::

    bits_per_dim = top prior bits + bottom prior bits (given top) + decoder bits (given both)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.utils.data import DataLoader

from vqprior.artifacts import save_image_grid
from vqprior.data import DataConfig, float_to_uint8, load_image_splits
from vqprior.io import CheckpointError, atomic_write_bytes, content_hash
from vqprior.models.hierarchy import (
    VQVAE2,
    TwoLevelNats,
    check_two_level,
    sample_two_level,
    two_level_nats,
)
from vqprior.models.pixelcnn import PixelCNN
from vqprior.sampling.noise import sampling_generator
from vqprior.train.codes import default_device, load_vae, read_vae_record
from vqprior.train.hierarchy import plain_data
from vqprior.train.inference import _labels, _run_data_config, load_prior
from vqprior.train.rundir import write_json

LN2 = math.log(2.0)


def load_two_level(
    top_dir: str | Path, bottom_dir: str | Path, vae_dir: str | Path | None = None
) -> tuple[VQVAE2, PixelCNN, PixelCNN]:
    """The VAE and its two priors; refuse priors of other levels or of another VAE."""
    priors, records = {}, {}
    for level, path in (("top", top_dir), ("bottom", bottom_dir)):
        prior, export = load_prior(path)
        record = read_vae_record(export)
        if record is None or record.get("level") != level:
            found = "no level" if record is None else f"level {record.get('level')!r}"
            raise ValueError(
                f"{path} is not a {level} prior of a two-level VAE ({found}): train it with "
                f"--set data.level={level}"
            )
        priors[level], records[level] = prior, record
    if records["top"]["vae_hash"] != records["bottom"]["vae_hash"]:
        raise CheckpointError(
            f"the top prior {top_dir} and the bottom prior {bottom_dir} were trained on "
            "different VAEs: pass two priors of the same VAE"
        )
    vae, vae_path = load_vae(vae_dir if vae_dir is not None else records["top"]["vae_path"])
    found = content_hash(vae_path)
    if found != records["top"]["vae_hash"]:
        raise CheckpointError(
            f"the VAE at {vae_path} (hash {found}) is not the one these priors were trained "
            f"on (hash {records['top']['vae_hash']}): pass that train-vae run dir"
        )
    if not isinstance(vae, VQVAE2):
        raise CheckpointError(f"the VAE at {vae_path} has one level: pass the two-level VAE")
    check_two_level(vae, priors["top"], priors["bottom"])
    return vae.eval(), priors["top"].eval(), priors["bottom"].eval()


def _class_count(top: PixelCNN, bottom: PixelCNN) -> PixelCNN:
    """The prior whose classes label the samples (a conditional one, if any)."""
    return top if top.config.num_classes else bottom


@torch.no_grad()
def generate_two_level(
    prior_dir: str | Path,
    bottom_prior_dir: str | Path,
    vae_dir: str | Path | None = None,
    num: int = 64,
    out_png: str | Path = "samples.png",
    seed: int = 0,
    temperature: float = 1.0,
    label: int | None = None,
    device: str | None = None,
    method: str = "auto",
) -> dict[str, Any]:
    """Sample ``num`` images (top, then bottom given top, then decode) into a PNG grid and
    ``<stem>.safetensors`` (``images`` uint8, ``top_codes``, ``bottom_codes``, ``labels``)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    vae, top, bottom = load_two_level(prior_dir, bottom_prior_dir, vae_dir)
    dev = default_device(device)
    vae, top, bottom = vae.to(dev), top.to(dev), bottom.to(dev)
    labelled = _class_count(top, bottom)
    cond = _labels(labelled, num, label, dev)
    gen = sampling_generator(seed)
    s = sample_two_level(vae, top, bottom, num, cond, temperature, gen, method)
    k = labelled.config.num_classes
    nrow = k if (k and label is None and k <= 16) else max(1, int(math.sqrt(num)))
    out_png = Path(out_png)
    save_image_grid(out_png, s.images.float().cpu(), nrow=nrow)
    tensors = {
        "images": float_to_uint8(s.images.cpu()).contiguous(),
        "top_codes": s.top.cpu().long().contiguous(),
        "bottom_codes": s.bottom.cpu().long().contiguous(),
    }
    if cond is not None:
        tensors["labels"] = cond.cpu().contiguous()
    raw = out_png.with_suffix(".safetensors")
    meta = {"prior": str(prior_dir), "bottom_prior": str(bottom_prior_dir)}
    atomic_write_bytes(raw, safetensors.torch.save(tensors, metadata=meta))
    return {"png": str(out_png), "tensors": str(raw), "num": num}


@torch.no_grad()
def evaluate_two_level(
    prior_dir: str | Path,
    bottom_prior_dir: str | Path,
    vae_dir: str | Path | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str | None = None,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """The two-level bound on a split: top + bottom prior bits + decoder bits, per image
    dimension; written to ``eval_two_level_<split>.json`` in the bottom prior's run dir."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    vae, top, bottom = load_two_level(prior_dir, bottom_prior_dir, vae_dir)
    dev = default_device(device)
    vae, top, bottom = vae.to(dev), top.to(dev), bottom.to(dev)
    splits = load_image_splits(plain_data(_run_data_config(Path(bottom_prior_dir), data)))
    conditional = bool(top.config.num_classes or bottom.config.num_classes)
    parts: list[TwoLevelNats] = []
    for x, y in DataLoader(getattr(splits, split), batch_size=batch_size):
        cond = y.to(dev) if conditional else None
        parts.append(two_level_nats(vae, top, bottom, x.to(dev), cond))
    if not parts:
        raise ValueError(f"the {split} split is empty: raise data.{split}_fraction")
    nats = TwoLevelNats(
        *(torch.cat([getattr(p, f) for p in parts]).cpu() for f in TwoLevelNats._fields)
    )
    n, dims = len(nats.top), splits.channels * splits.height * splits.width
    result: dict[str, Any] = dict(nats.bits_per_dim(dims))
    result["top_bits_per_code"] = float(nats.top.sum()) / (n * top.num_dims * LN2)
    result["bottom_bits_per_code"] = float(nats.bottom.sum()) / (n * bottom.num_dims * LN2)
    if vae.config.recon != "mixture":
        for key in ("decoder_bits_per_dim", "bits_per_dim"):
            result.pop(key)
        result["note"] = "the VAE has recon=mse (no discrete likelihood): only the priors' parts"
    else:
        result["note"] = "bits_per_dim = top + bottom prior bits + decoder bits (an upper bound)"
    result.update(split=split, num_examples=n)
    if (Path(bottom_prior_dir) / "config.yaml").is_file():
        write_json(Path(bottom_prior_dir) / f"eval_two_level_{split}.json", result)
    return result
