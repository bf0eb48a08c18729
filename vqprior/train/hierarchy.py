"""Which level of a VQ-VAE a prior models: the ``data.level`` rules and each level's record.

A VQ-VAE has one level (``("codes",)``: a prior on its codes needs no ``data.level``) or two
(``("top", "bottom")``: a prior names its level, ``--set data.level=top|bottom``). A prior on
level 0 (the top, or the only level) models its codes alone; a prior on level ``i > 0`` is
conditioned on the codes of level ``i - 1`` (``model.spatial_cond_channels`` <- the VAE's
``code_dim``, see :class:`vqprior.train.hierarchy_prior.BottomPriorModule`). Encoding every
level and reading the stored codes back: :mod:`vqprior.train.codes`.

This module imports no Lightning (encode and inference use it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vqprior.config import ConfigError
from vqprior.data import DataConfig
from vqprior.models.vqvae import VQVAE
from vqprior.train.config import fill_field


def data_levels(vae: VQVAE) -> tuple[str | None, ...]:
    """The ``data.level`` of a prior on each level, top first: None for a one-level VAE (its
    level is implicit), else the level names."""
    return (None,) if vae.config.levels == 1 else tuple(vae.level_names)


def level_index(vae: VQVAE, level: str | None) -> int:
    """The index (top first) of the level ``data.level`` names; ConfigError (one line) unless a
    VAE of several levels gets a level and a one-level VAE none."""
    levels = data_levels(vae)
    if level in levels:
        return levels.index(level)
    if level is None:
        names = vae.level_names
        raise ConfigError(
            f"the VAE has {len(names)} levels ({' and '.join(names)} code maps): set "
            + " or ".join(f"data.level={n}" for n in names)
        )
    raise ConfigError(
        f"data.level={level} needs a two-level VAE (model.levels=2); this VAE has one "
        "level: drop data.level"
    )


def level_record(record: dict[str, Any], vae: VQVAE, level: str | None) -> dict[str, Any]:
    """The VAE record of a prior on one level: that level's ``grid`` (and, for a VAE of several
    levels, its ``level`` and the VAE's ``code_dim``)."""
    i = level_index(vae, level)
    if level is None:
        return record
    _, height, width = record["image_shape"]
    grid = vae.level_shapes(height, width)[i]
    return {**record, "grid": list(grid), "level": level, "code_dim": vae.config.code_dim}


def level_records(record: dict[str, Any], vae: VQVAE) -> tuple[dict[str, Any], ...]:
    """:func:`level_record` of every level, top first."""
    return tuple(level_record(record, vae, level) for level in data_levels(vae))


def fill_level_fields(model: dict[str, Any], vae: VQVAE, level: str | None) -> None:
    """A prior on level ``i > 0`` sees the level above (``spatial_cond_channels`` = the VAE's
    code_dim); a prior on level 0 sees none (0)."""
    if level_index(vae, level):
        source = "the VAE's code_dim (the bottom prior's top condition)"
        fill_field(model, "spatial_cond_channels", vae.config.code_dim, source)
    else:
        fill_field(model, "spatial_cond_channels", 0, "a top-level prior (no spatial condition)")


def resolve_level(
    model: dict[str, Any], vae: VQVAE, record: dict[str, Any], data: DataConfig
) -> dict[str, Any]:
    """train-prior's hook: the record of the prior's level (its grid) and
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
