"""Load a prior (and, for a codes prior, its VAE) for the "use" commands, without Lightning.

A codes prior's export holds ``vae.json`` (written by train-prior): the VAE's content hash,
path and image shape. A VAE whose hash differs is refused with one line, and so is a model of
a two-level VQ-VAE (a ``data.level=top|bottom`` prior or a ``levels=2`` VAE): the uses
support one-level models for now.

:func:`class_labels` is the one rule for class labels, shared by every command (generate's
``--label`` included): a label must lie in ``[0, num_classes)``, and an unconditional prior
refuses ``--label``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vqprior.io import CheckpointError, content_hash
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE

logger = logging.getLogger(__name__)

VAE_RECORD = "vae.json"  # the training layer's record of a codes prior's VAE
MODEL_DIR = "model"
TWO_LEVEL_HINT = (
    "score, complete and compress support one-level models for now; "
    "use vqprior generate/evaluate --prior TOP --bottom-prior BOTTOM"
)


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


def check_label(num_classes: int, label: int | None) -> None:
    """``--label``'s rule in every command: refused by an unconditional prior
    (``num_classes == 0``), else it must lie in ``[0, num_classes)``."""
    if label is None:
        return
    if not num_classes:
        raise ValueError("this prior is unconditional: drop --label")
    if not 0 <= label < num_classes:
        raise ValueError(f"--label {label} must lie in [0, {num_classes})")


def class_labels(
    num_classes: int,
    n: int,
    label: int | None = None,
    data: Tensor | None = None,
    missing: str | None = None,
) -> Tensor | None:
    """The labels long ``[n]`` (CPU) of ``n`` images for a prior with ``num_classes`` classes.

    ``label`` (the ``--label`` flag, see :func:`check_label`) wins over ``data`` (the labels
    ``y`` read with the images: ignored by an unconditional prior, checked against the range
    otherwise). None for an unconditional prior, or for a conditional one given no labels when
    ``missing`` is None (the caller's default: generate cycles the classes, score takes the
    mixture over them); else ``missing`` says how to give labels in the refusal.
    """
    check_label(num_classes, label)
    if not num_classes:
        return None
    if label is not None:
        return torch.full((n,), label, dtype=torch.long)
    if data is not None:
        if data.shape != (n,):
            raise ValueError(f"{n} images but labels y of shape {tuple(data.shape)}")
        bad = data[(data < 0) | (data >= num_classes)]
        if len(bad):
            raise ValueError(
                f"label y={int(bad[0])} of the images lies outside this prior's classes "
                f"[0, {num_classes}): fix the .npz labels y"
            )
        return data.long().cpu()
    if missing is not None:
        raise ValueError(f"this prior is class-conditional ({num_classes} classes): {missing}")
    return None


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


def _refuse_two_level_prior(
    prior: PixelCNN, prior_path: Path, record: dict[str, Any] | None
) -> None:
    """A prior on one level of a two-level VAE (its record names the ``level``; a bottom prior
    also takes the top codes as a spatial condition) is refused with one line."""
    level = None if record is None else record.get("level")
    if level is None and prior.config.data == "codes" and prior.config.spatial_cond_channels:
        level = "bottom"
    if level is not None:
        raise ValueError(
            f"{prior_path} is the {level} prior of a two-level VQ-VAE: {TWO_LEVEL_HINT}"
        )


def _load_vae(
    prior: PixelCNN, prior_path: Path, vae_dir: str | Path | None, record: dict[str, Any] | None
) -> tuple[VQVAE, Path]:
    if vae_dir is None:
        if record is None or "vae_path" not in record:
            raise ValueError(f"{prior_path} is a prior on codes: pass --vae <train-vae run dir>")
        vae_dir = record["vae_path"]
    vae_path = find_export(vae_dir, "VAE")
    vae = VQVAE.from_pretrained(vae_path)
    if vae.config.levels != 1:
        raise ValueError(f"the VAE at {vae_path} is a two-level VQ-VAE: {TWO_LEVEL_HINT}")
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
    """The prior of a train-prior run dir (or export dir) and, for a codes prior, its VAE.

    Models of a two-level VQ-VAE are refused with one line (ValueError)."""
    prior_path = find_export(prior_dir, "prior")
    prior = PixelCNN.from_pretrained(prior_path)
    record = _read_record(prior_path)
    _refuse_two_level_prior(prior, prior_path, record)
    dev = torch.device(device or "cpu")
    if prior.config.data != "codes":
        if vae_dir is not None:
            raise ValueError(f"{prior_path} is a prior on pixels: drop --vae")
        return Models(prior.to(dev).eval(), prior_path, content_hash(prior_path), None, None, None)
    vae, vae_path = _load_vae(prior, prior_path, vae_dir, record)
    return Models(
        prior.to(dev).eval(),
        prior_path,
        content_hash(prior_path),
        vae.to(dev).eval(),
        vae_path,
        content_hash(vae_path),
    )
