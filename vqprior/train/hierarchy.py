"""The two-level VQ-VAE (``model.levels=2``) in the training layer.

- train-vae: codebook usage per level (``codes_used_top``, ``perplexity_bottom``, ...) and
  reconstruction grids through both levels (:func:`vqprior.models.hierarchy.level_quantizers`,
  :func:`vqprior.models.hierarchy.reconstruct`).
- encode: the bottom codes in ``<out>/<split>.safetensors`` (where one-level codes go) and the
  top codes in ``<out>/top/<split>.safetensors``; each a plain code file whose meta records
  its ``level``.
- train-prior with ``data.level=top`` (the top grid, no spatial condition) or
  ``data.level=bottom`` (the bottom grid; ``model.spatial_cond_channels`` <- the VAE's
  ``code_dim``; each batch's spatial condition is the top codes' codebook vectors upsampled
  to the bottom grid, :func:`vqprior.models.hierarchy.top_condition`).
- generate / evaluate with a top prior and a bottom prior: see
  :mod:`vqprior.train.hierarchy_infer`.

This module imports no Lightning (encode and inference use it); the training parts (the
bottom prior's module and batches) are in :mod:`vqprior.train.hierarchy_prior`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vqprior.artifacts import save_codes
from vqprior.config import ConfigError
from vqprior.data import DataConfig, ImageSplits
from vqprior.lock import RunLock
from vqprior.models.hierarchy import VQVAE2
from vqprior.models.vqvae import VQVAE
from vqprior.train.codes import SPLITS, Codes, _meta, default_device, stored_codes
from vqprior.train.config import fill_field

logger = logging.getLogger(__name__)

LEVELS = ("top", "bottom")
LevelCodes = dict[str, Codes]  # level -> split -> (codes long [N, h, w], labels long [N])


# ---------------------------------------------------------------------------------- levels
def check_level(vae: VQVAE, level: str | None) -> None:
    """A two-level VAE needs ``data.level``; a one-level VAE refuses it."""
    if isinstance(vae, VQVAE2) and level is None:
        raise ConfigError(
            "the VAE has two levels (top and bottom code maps): set data.level=top or "
            "data.level=bottom"
        )
    if level is not None and not isinstance(vae, VQVAE2):
        raise ConfigError(
            f"data.level={level} needs a two-level VAE (model.levels=2); this VAE has one "
            "level: drop data.level"
        )


def level_record(record: dict[str, Any], vae: VQVAE, level: str | None) -> dict[str, Any]:
    """The VAE record of a prior on one level: that level's ``grid`` and ``level``."""
    check_level(vae, level)
    if level is None:
        return record
    assert isinstance(vae, VQVAE2)
    _, height, width = record["image_shape"]
    grid = vae.top_shape(height, width) if level == "top" else vae.latent_shape(height, width)
    return {**record, "grid": list(grid), "level": level, "code_dim": vae.config.code_dim}


def fill_level_fields(model: dict[str, Any], vae: VQVAE, level: str | None) -> None:
    """A bottom prior's ``spatial_cond_channels`` is the VAE's code_dim; a top prior's 0."""
    if level == "bottom":
        source = "the VAE's code_dim (the bottom prior's top condition)"
        fill_field(model, "spatial_cond_channels", vae.config.code_dim, source)
    elif level == "top":
        fill_field(model, "spatial_cond_channels", 0, "a top prior (no spatial condition)")


def level_dir(root: Path, level: str) -> Path:
    """Where a level's code files live: ``root/top`` for the top, ``root`` for the bottom."""
    return root / "top" if level == "top" else root


def resolve_level(
    model: dict[str, Any], vae: VQVAE, record: dict[str, Any], data: DataConfig
) -> dict[str, Any]:
    """train-prior's hook: the record of the prior's level (its grid) and, for a bottom prior,
    ``model.spatial_cond_channels``."""
    fill_level_fields(model, vae, data.level)
    return level_record(record, vae, data.level)


def refuse_level(data: DataConfig) -> None:
    """A prior on pixels refuses ``data.level``."""
    if data.level is not None:
        raise ConfigError(
            f"data.level={data.level} applies to a prior on the codes of a two-level VAE: "
            "set vae or drop data.level"
        )


def check_vae_data(data: DataConfig) -> None:
    """train-vae refuses ``data.level`` (it belongs to a prior)."""
    if data.level is not None:
        raise ConfigError("data.level belongs to train-prior (which level a prior models): drop it")


def plain_data(data_cfg: DataConfig) -> DataConfig:
    """The data config without ``level``: what a code file's meta records (shared by levels)."""
    return dataclasses.replace(data_cfg, level=None)


# ---------------------------------------------------------------------------------- encode
@torch.no_grad()
def encode_levels_dataset(
    vae: VQVAE2, ds: Dataset[Any], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images -> top codes [N, ht, wt], bottom codes [N, hb, wb], labels [N] (on CPU)."""
    vae = vae.to(device).eval()
    tops, bottoms, labels = [], [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        top, bottom = vae.encode_levels(x.to(device))
        tops.append(top.cpu())
        bottoms.append(bottom.cpu())
        labels.append(y.long())
    if not labels:
        empty = torch.zeros(0, 0, 0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    return torch.cat(tops), torch.cat(bottoms), torch.cat(labels)


def encode_level_splits(
    vae: VQVAE2,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    batch_size: int = 256,
    device: str | None = None,
) -> LevelCodes:
    """Encode train/val/test into ``out/top/<split>.safetensors`` (top) and
    ``out/<split>.safetensors`` (bottom)."""
    data = plain_data(data_cfg)
    result: LevelCodes = {level: {} for level in LEVELS}
    records = {level: level_record(record, vae, level) for level in LEVELS}
    for split in SPLITS:
        ds = getattr(splits, split)
        top, bottom, labels = encode_levels_dataset(vae, ds, batch_size, default_device(device))
        for level, codes in (("top", top), ("bottom", bottom)):
            rec = records[level]
            if len(codes) == 0:
                codes = torch.zeros(0, *rec["grid"], dtype=torch.long)
            meta = {**_meta(rec, data, split), "level": level}
            save_codes(level_dir(out, level) / f"{split}.safetensors", codes, labels, meta)
            result[level][split] = (codes, labels)
    logger.info(
        "encoded both levels of %s into %s", {k: len(v[0]) for k, v in result["top"].items()}, out
    )
    return result


def encode_codes_levels(
    vae: VQVAE,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, Path]:
    """``vqprior encode`` of a two-level VAE: both levels' files, under the run lock."""
    assert isinstance(vae, VQVAE2)
    with RunLock(out):
        encode_level_splits(vae, record, splits, data_cfg, out, batch_size, device)
    return {
        f"{level}_{s}": level_dir(out, level) / f"{s}.safetensors"
        for level in LEVELS
        for s in SPLITS
    }


def level_codes(
    vae: VQVAE2,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    codes_dir: Path | None,
    batch_size: int,
    device: str | None,
) -> LevelCodes:
    """Both levels' codes: from ``codes_dir`` (refused unless this VAE and data made them),
    else from ``<out>/codes`` when still valid, else encoded now."""
    data = plain_data(data_cfg)
    records = {level: level_record(record, vae, level) for level in LEVELS}
    root, strict = (codes_dir, True) if codes_dir is not None else (out / "codes", False)
    found = {
        level: stored_codes(level_dir(root, level), records[level], data, strict)
        for level in LEVELS
    }
    if all(v is not None for v in found.values()):
        return {k: v for k, v in found.items() if v is not None}
    return encode_level_splits(vae, record, splits, data_cfg, out / "codes", batch_size, device)
