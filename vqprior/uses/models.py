"""Load a prior (and, for a codes prior, its VAE) for the "use" commands, without Lightning.

A codes prior's export holds ``vae.json`` (written by train-prior): the VAE's content hash,
path and image shape. A VAE whose hash differs is refused with one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vqprior.io import CheckpointError, content_hash
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE

logger = logging.getLogger(__name__)

VAE_RECORD = "vae.json"  # the training layer's record of a codes prior's VAE
MODEL_DIR = "model"


class Models(NamedTuple):
    """A prior and (codes prior) its VAE, in eval mode, with their export dirs and hashes."""

    prior: PixelCNN
    prior_path: Path
    prior_hash: str
    vae: VQVAE | None
    vae_path: Path | None
    vae_hash: str | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this model scores and codes."""
        cfg = self.prior.config
        if self.vae is None:
            return cfg.in_channels, cfg.height, cfg.width
        ds = self.vae.config.downsample
        return self.vae.config.in_channels, cfg.height * ds, cfg.width * ds


def find_export(path: str | Path, what: str) -> Path:
    """An exported model dir: ``path`` itself or ``path/model`` (a run dir)."""
    p = Path(path)
    if (p / MODEL_DIR / "config.json").is_file():
        return p / MODEL_DIR
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} not found")
    raise FileNotFoundError(
        f"no exported {what} at {p}: pass a run dir (holding model/) or an exported model dir"
    )


def _read_record(prior_path: Path) -> dict[str, Any] | None:
    path = prior_path / VAE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({err})") from None
    return record if isinstance(record, dict) else None


def _load_vae(prior: PixelCNN, prior_path: Path, vae_dir: str | Path | None) -> tuple[VQVAE, Path]:
    record = _read_record(prior_path)
    if vae_dir is None:
        if record is None or "vae_path" not in record:
            raise ValueError(f"{prior_path} is a prior on codes: pass --vae <train-vae run dir>")
        vae_dir = record["vae_path"]
    vae_path = find_export(vae_dir, "VAE")
    vae = VQVAE.from_pretrained(vae_path)
    if vae.config.num_codes != prior.config.num_codes:
        raise CheckpointError(
            f"the VAE at {vae_path} has {vae.config.num_codes} codes but the prior models "
            f"{prior.config.num_codes}: pass the VAE this prior was trained on"
        )
    if record is None or "vae_hash" not in record:
        logger.warning("%s records no VAE hash: cannot check %s", prior_path, vae_path)
    elif (found := content_hash(vae_path)) != record["vae_hash"]:
        raise CheckpointError(
            f"the VAE at {vae_path} (hash {found}) is not the one this prior was trained on "
            f"(hash {record['vae_hash']}): pass that train-vae run dir"
        )
    return vae, vae_path


def load_models(
    prior_dir: str | Path, vae_dir: str | Path | None = None, device: str | None = None
) -> Models:
    """The prior of a train-prior run dir (or export dir) and, for a codes prior, its VAE."""
    prior_path = find_export(prior_dir, "prior")
    prior = PixelCNN.from_pretrained(prior_path)
    dev = torch.device(device or "cpu")
    if prior.config.data != "codes":
        if vae_dir is not None:
            raise ValueError(f"{prior_path} is a prior on pixels: drop --vae")
        return Models(prior.to(dev).eval(), prior_path, content_hash(prior_path), None, None, None)
    vae, vae_path = _load_vae(prior, prior_path, vae_dir)
    return Models(
        prior.to(dev).eval(),
        prior_path,
        content_hash(prior_path),
        vae.to(dev).eval(),
        vae_path,
        content_hash(vae_path),
    )
