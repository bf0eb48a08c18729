"""train-prior on one level of a VQ-VAE's codes, for one level as for two: batches, the module
(level 0: :class:`PriorModule`; level ``i > 0``: :class:`BottomPriorModule`, whose spatial
condition is the codes of level ``i - 1``'s codebook vectors upsampled to its grid) and the
image grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from vqprior.data import ImageSplits
from vqprior.models.levels import upsample_codes
from vqprior.models.vqvae import VQVAE
from vqprior.sampling.noise import sampling_generator
from vqprior.streaming import is_code_shard_dir, is_code_shards
from vqprior.train.codes import LevelCodes, level_codes
from vqprior.train.config import DeviceOptions, PriorStageConfig
from vqprior.train.datamodule import (
    SplitsDataModule,
    codes_datamodule,
    condition_codes,
    shard_codes_datamodule,
)
from vqprior.train.hierarchy import level_index
from vqprior.train.prior import Inputs, PriorModule


# ----------------------------------------------------------------------------- train-prior
def level_datamodule(
    codes: LevelCodes, i: int, batch_size: int, num_workers: int, seed: int
) -> tuple[SplitsDataModule, bool]:
    """Batches of level ``i`` (top first): level 0 (codes, y); level ``i > 0`` (codes, y, the
    codes of level ``i - 1``). Also whether val is non-empty."""
    if i == 0:
        dm = codes_datamodule(codes[0], batch_size, num_workers, seed)
    else:
        sets = {
            split: TensorDataset(level, labels, codes[i - 1][split][0])
            for split, (level, labels) in codes[i].items()
        }
        dm = SplitsDataModule(
            sets["train"], sets["val"], sets["test"], batch_size, num_workers, seed
        )
    return dm, len(codes[i]["val"][0]) > 0


class BottomPriorModule(PriorModule):
    """A bottom prior: batches (bottom, y, top); the spatial condition of every layer is
    :func:`~vqprior.models.levels.upsample_codes` of the top codes (as :meth:`LevelModel.condition`), from a frozen copy
    ``top_embed`` of the VAE's top codebook.

    Only :meth:`_inputs` differs: the step (class dropout, ``compile``, metrics), exports, EMA
    weights and hyperparameters are those of :class:`PriorModule`.
    """

    top_embed: torch.Tensor

    def __init__(
        self,
        model: dict[str, Any],
        train: dict[str, Any],
        vae: dict[str, Any] | None = None,
        compile: bool = False,
        top_embed: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, train, vae, compile)
        cfg = self.model.config
        embed = top_embed if top_embed is not None else torch.zeros(cfg.num_codes, 1)
        if embed.shape != (cfg.num_codes, cfg.spatial_cond_channels):
            raise ValueError(
                f"the top codebook {tuple(embed.shape)} does not fit the bottom prior "
                f"({cfg.num_codes} codes, spatial_cond_channels={cfg.spatial_cond_channels})"
            )
        self.register_buffer("top_embed", embed.detach().clone().float())
        self.fixed_top: torch.Tensor | None = None  # top codes whose bottoms the grids sample

    def _inputs(self, batch: Any) -> Inputs:
        """Batches (bottom, y, top) -> (bottom, y, the top codes' upsampled codebook vectors)."""
        x, y, top = batch
        grid = (x.shape[1], x.shape[2])
        spatial = upsample_codes(self.top_embed, top, grid, check=False)  # see _step
        return x, y, self.memory_format(spatial.to(self.dtype))

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """Bottom codes [n, hb, wb] given the top codes ``fixed_top`` (repeated to n)."""
        if self.fixed_top is None:
            raise ValueError("set fixed_top (top codes) before sampling a bottom prior")
        model = self.eval_model
        dev = model.device  # the weights' device, whatever the module reports
        top = self.fixed_top.to(dev)
        top = top[torch.arange(n, device=dev) % len(top)]
        k = model.config.num_classes
        cond = torch.arange(n, device=dev) % k if k else None
        grid = (model.config.height, model.config.width)
        spatial = upsample_codes(self.top_embed.to(dev), top, grid)
        return model.sample(
            n, cond=cond, temperature=temperature, generator=generator, spatial_cond=spatial
        )


# ------------------------------------------------------------------------ stage-two wiring
def level_prior_parts(
    cfg: PriorStageConfig,
    splits: ImageSplits,
    vae: VQVAE,
    record: dict[str, Any],
    out: Path,
    codes_dir: Path | None,
    device: DeviceOptions,
) -> tuple[SplitsDataModule, bool, PriorModule, Any]:
    """What train-prior needs for a prior on one level of the VAE's codes (``record``'s
    ``level``; a one-level VAE's only level): datamodule, whether there is a val split, the
    module and the image-grid function. Codes come from :func:`level_codes` (in memory), or
    stream from code shards (``data.name: stream`` on ``vqprior encode --format shards``, or
    ``--codes`` naming such a directory)."""
    i, train = level_index(vae, record.get("level")), cfg.train
    model, train_dict, n = cfg.model.to_dict(), train.to_dict(), train.num_sample_images
    shard_dir = codes_dir is not None and is_code_shard_dir(codes_dir)
    shards = splits if is_code_shards(splits) else codes_dir if shard_dir else None
    if shards is not None:  # streamed
        dm, has_val = shard_codes_datamodule(
            shards, record, train.batch_size, train.num_workers, train.seed
        )
        tops = condition_codes(dm, has_val, n) if i else None
    else:  # every level's codes in memory
        codes = level_codes(vae, record, splits, cfg.data, out, codes_dir, device.data_device())
        dm, has_val = level_datamodule(codes, i, train.batch_size, train.num_workers, train.seed)
        tops = codes[i - 1]["val" if has_val else "train"][0][:n] if i else None
    nrow = grid_nrow(n, cfg.model.num_classes)
    if i < len(vae.level_names) - 1:  # a level above others: its samples as code maps
        grid = _top_grid(vae, splits, n, nrow)
    else:  # the finest level: its samples decoded through the VAE
        grid = _bottom_grid(vae, n, nrow)
    if i == 0:
        return dm, has_val, PriorModule(model, train_dict, record, compile=device.compile), grid
    above = vae.codebooks[i - 1].embed
    module = BottomPriorModule(model, train_dict, record, compile=device.compile, top_embed=above)
    module.fixed_top = tops
    return dm, has_val, module, grid


def grid_nrow(n: int, num_classes: int) -> int:
    """Images per row of a grid of ``n`` samples: one column per class when 0 < K <= 16."""
    return num_classes if 0 < num_classes <= 16 else max(1, int(math.sqrt(n)))


def _top_grid(vae: VQVAE, splits: ImageSplits, n: int, nrow: int = 8) -> Any:
    """Top prior samples drawn as code maps: code index k as gray level 2k/(K-1) - 1."""
    k = vae.config.num_codes

    def make(module: PriorModule) -> tuple[torch.Tensor, int]:
        top = module.sample(n, generator=sampling_generator(module.train_cfg.seed)).float()
        maps = top[:, None] * (2.0 / (k - 1)) - 1.0  # [n, 1, ht, wt]
        size = (splits.height, splits.width)
        return torch.nn.functional.interpolate(maps, size=size, mode="nearest"), nrow

    return make


def _bottom_grid(vae: VQVAE, n: int, nrow: int = 8) -> Any:
    """Samples of the finest level decoded through the VAE: a one-level prior's alone, a
    bottom prior's given the top codes of fixed images (``fixed_top``)."""

    def make(module: PriorModule) -> tuple[torch.Tensor, int]:
        samples = module.sample(n, generator=sampling_generator(module.train_cfg.seed))
        above: tuple[torch.Tensor, ...] = ()
        if isinstance(module, BottomPriorModule):
            assert module.fixed_top is not None
            top = module.fixed_top.to(samples.device)
            above = (top[torch.arange(n, device=samples.device) % len(top)],)
        return vae.to(samples.device).eval().decode_levels(*above, samples), nrow

    return make
