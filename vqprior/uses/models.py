"""Load a prior (and, for a codes prior, its VAE) for the "use" commands, without Lightning.

A codes prior's export holds ``vae.json`` (written by train-prior): the VAE's content hash,
path, image shape and, for a two-level VAE, the ``level`` it models. A VAE whose hash differs
is refused with one line; a two-level model is its top prior, its bottom prior and the VAE
(:class:`~vqprior.models.levels.LevelModel`), checked level by level. This is the one loader
of every command that uses a trained prior (generate, evaluate, score, complete, compress).

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
from vqprior.models.levels import LevelModel
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE
from vqprior.train.rundir import find_export

logger = logging.getLogger(__name__)

VAE_RECORD = "vae.json"  # the training layer's record of a codes prior's VAE


class Models(NamedTuple):
    """A :class:`LevelModel` (a pixel prior, or a VAE and one prior per level, top first) in
    eval mode, with the export dirs and content hashes of its priors and VAE."""

    model: LevelModel
    prior_paths: tuple[Path, ...]
    prior_hashes: tuple[str, ...]
    vae_path: Path | None
    vae_hash: str | None

    @property
    def prior(self) -> PixelCNN:
        """The top prior (the only one of a one-level model)."""
        return self.model.priors[0]

    @property
    def vae(self) -> VQVAE | None:
        return self.model.vae

    @property
    def prior_path(self) -> Path:
        return self.prior_paths[0]

    @property
    def prior_hash(self) -> str:
        """The priors' content hashes, top first, joined by ``+``."""
        return "+".join(self.prior_hashes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this model scores and codes."""
        cfg = self.prior.config
        if self.vae is None:
            return cfg.in_channels, cfg.height, cfg.width
        scale = self.vae.config.downsample * (
            self.vae.config.top_downsample ** (self.vae.config.levels - 1)
        )
        return self.vae.config.in_channels, cfg.height * scale, cfg.width * scale


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


def _read_record(prior_path: Path) -> dict[str, Any] | None:
    path = prior_path / VAE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({err})") from None
    return record if isinstance(record, dict) else None


def _level_of(prior: PixelCNN, record: dict[str, Any] | None) -> str | None:
    """The level a codes prior models: its record's ``level`` (a two-level VAE's top or bottom),
    ``"bottom"`` for a prior with a spatial condition and no record, else None (one level)."""
    level = None if record is None else record.get("level")
    if level is None and prior.config.data == "codes" and prior.config.spatial_cond_channels:
        return "bottom"
    return level


def _load_vae(
    priors: list[PixelCNN], paths: list[Path], vae_dir: str | Path | None, records: list[Any]
) -> tuple[VQVAE, Path]:
    """The VAE of codes priors (``vae_dir``, else the one their records name); refuse priors
    given at the wrong level and a VAE whose codebook, grids or hash are not theirs."""
    hashes = {r.get("vae_hash") for r in records if r is not None}
    if len(hashes) > 1:
        raise CheckpointError(
            f"the priors {', '.join(map(str, paths))} were trained on different VAEs: pass "
            "priors of the same VAE"
        )
    record = next((r for r in records if r is not None), None)
    if vae_dir is None:
        if record is None or "vae_path" not in record:
            raise ValueError(f"{paths[0]} is a prior on codes: pass --vae <train-vae run dir>")
        vae_dir = record["vae_path"]
    vae_path = find_export(vae_dir, "VAE")
    vae = VQVAE.from_pretrained(vae_path)
    k = priors[0].config.num_codes
    if vae.config.num_codes != k:
        raise CheckpointError(
            f"the VAE at {vae_path} has {vae.config.num_codes} codes but the prior models "
            f"{k}: pass the VAE this prior was trained on"
        )
    levels = [_level_of(p, r) for p, r in zip(priors, records, strict=True)]
    found = content_hash(vae_path)
    wrong = record is not None and "vae_hash" in record and found != record["vae_hash"]
    if not wrong or (levels[0] is None) == (vae.config.levels == 1):  # a wrong VAE of another
        _check_order(paths, levels, vae)  # level count is named by its hash below
        _check_grids(priors, record, vae, vae_path)
    if record is None or "vae_hash" not in record:
        logger.warning("%s records no VAE hash: cannot check %s", paths[0], vae_path)
    elif wrong:
        raise CheckpointError(
            f"the VAE at {vae_path} (hash {found}) is not the one this prior was trained on "
            f"(hash {record['vae_hash']}): pass that train-vae run dir"
        )
    return vae, vae_path


def _check_order(paths: list[Path], levels: list[str | None], vae: VQVAE) -> None:
    """The priors name the VAE's levels top first: one line for a missing or misplaced one."""
    names = list(vae.level_names) if vae.config.levels > 1 else [None]
    if levels == names:
        return
    if vae.config.levels == 1:
        raise ValueError(f"the VAE of {paths[0]} has one level: drop --bottom-prior")
    for path, level, want in zip(paths, levels, names, strict=False):
        if level != want:
            raise ValueError(
                f"{path} models the {level or 'one-level'} codes but is given as the {want} "
                f"prior: pass the top prior as --prior and the bottom prior as --bottom-prior"
            )
    raise ValueError(
        f"{paths[0]} is the top prior of a two-level VQ-VAE: pass its bottom prior as "
        "--bottom-prior"
    )


def _check_grids(
    priors: list[PixelCNN], record: dict[str, Any] | None, vae: VQVAE, vae_path: Path
) -> None:
    """Refuse a VAE whose code maps (for the recorded image size) are not the priors' grids."""
    if record is None or "image_shape" not in record or len(priors) != vae.config.levels:
        return  # a missing or extra level is named by _check_order
    _, height, width = record["image_shape"]
    want = [tuple(s) for s in vae.level_shapes(height, width)]
    got = [(p.config.height, p.config.width) for p in priors]
    if want != got:
        raise CheckpointError(
            f"the VAE at {vae_path} makes {want} code maps but the prior models {got}: pass "
            "the VAE this prior was trained on"
        )


def load_models(
    prior_dir: str | Path,
    vae_dir: str | Path | None = None,
    device: str | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> Models:
    """A model from run dirs (or export dirs): a pixel prior, or a codes prior and its VAE, or
    a two-level VAE's top prior (``prior_dir``) and bottom prior (``bottom_prior_dir``)."""
    dirs = [prior_dir] if bottom_prior_dir is None else [prior_dir, bottom_prior_dir]
    paths = [find_export(d, "prior") for d in dirs]
    priors = [PixelCNN.from_pretrained(p) for p in paths]
    records = [_read_record(p) for p in paths]
    dev = torch.device(device or "cpu")
    hashes = tuple(content_hash(p) for p in paths)
    if priors[0].config.data != "codes":
        if vae_dir is not None or bottom_prior_dir is not None:
            raise ValueError(f"{paths[0]} is a prior on pixels: drop --vae and --bottom-prior")
        return Models(LevelModel(None, priors).to(dev).eval(), tuple(paths), hashes, None, None)
    vae, vae_path = _load_vae(priors, paths, vae_dir, records)
    try:
        model = LevelModel(vae, priors)
    except ValueError as err:
        raise CheckpointError(
            f"{', '.join(map(str, paths))} do not fit {vae_path}: {err}"
        ) from None
    vae_hash = content_hash(vae_path)
    return Models(model.to(dev).eval(), tuple(paths), hashes, vae_path, vae_hash)
