"""LightningDataModules over vqprior.data's plain datasets (images or code maps).

The training order is a function of (seed, global step) (see :mod:`vqprior.train.resume`),
so a resumed run sees the batches an uninterrupted one would; no loader touches the global
RNG. The DataModule shards across DDP ranks itself: build the Trainer with
``use_distributed_sampler=False``.

Streaming shards (``data.name: stream``, :class:`vqprior.streaming.ShardDataset`) train through
litdata's ``StreamingDataLoader`` instead: litdata shuffles (seeded by ``seed``, new each
epoch) and splits across ranks, and Lightning saves and restores the loader's position in
checkpoints. Their val and test sets go through the same samplers as in-memory sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vqprior.artifacts import CodesDataset
from vqprior.data import DataConfig, ImageSplits
from vqprior.streaming import ShardDataset, check_code_shards, stream_loader, stream_splits
from vqprior.train.resume import ShardBatchSampler, StreamBatchSampler


class SplitsDataModule(L.LightningDataModule):
    """Train/val/test datasets of ``(x, y)`` items -> DataLoaders (train: a seeded stream).

    ``seed`` (default: ``torch.initial_seed()`` when the module is built, i.e. the seed given
    to ``seed_everything``) fixes the training order.
    """

    def __init__(
        self,
        train: Dataset[Any],
        val: Dataset[Any],
        test: Dataset[Any],
        batch_size: int,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed = torch.initial_seed() if seed is None else seed

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _loader(self, ds: Dataset[Any], batches: Sampler[list[int]]) -> DataLoader[Any]:
        return DataLoader(
            ds,
            batch_sampler=batches,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # worker seeds come from here, not from the global RNG (which iter() would consume)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_sampler(self) -> StreamBatchSampler:
        """The training batches; each ``iter()`` starts at the trainer's global step."""
        rank, world = self._rank_world()
        n = len(self.train_set)  # type: ignore[arg-type]
        return StreamBatchSampler(n, self.batch_size, self.seed, rank, world, self._global_step)

    def train_dataloader(self) -> DataLoader[Any]:
        if isinstance(self.train_set, ShardDataset):  # built here: after DDP has started
            return stream_loader(self.train_set, self.batch_size, self.num_workers, self.seed)
        return self._loader(self.train_set, self.train_sampler())

    def _eval_loader(self, ds: Dataset[Any]) -> DataLoader[Any]:
        rank, world = self._rank_world()
        n = len(ds)  # type: ignore[arg-type]
        return self._loader(ds, ShardBatchSampler(n, self.batch_size, rank, world))

    def val_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader(self.test_set)


def image_datamodule(
    splits: ImageSplits, batch_size: int, num_workers: int = 0, seed: int | None = None
) -> SplitsDataModule:
    """Images: items (x float [c, H, W] in [-1, 1], y long)."""
    return SplitsDataModule(splits.train, splits.val, splits.test, batch_size, num_workers, seed)


def codes_datamodule(
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    num_workers: int = 0,
    seed: int | None = None,
) -> SplitsDataModule:
    """Code maps: ``codes[split] = (codes long [N, h, w], labels long [N])``."""
    sets = {k: CodesDataset(c, y) for k, (c, y) in codes.items()}
    return SplitsDataModule(sets["train"], sets["val"], sets["test"], batch_size, num_workers, seed)


def shard_codes_datamodule(
    source: ImageSplits | str | Path,
    record: dict[str, Any],
    batch_size: int,
    num_workers: int = 0,
    seed: int | None = None,
) -> tuple[SplitsDataModule, bool]:
    """Code-map shards (``vqprior encode --format shards``): ``data.name: stream`` splits, or
    the shard directory (``--codes DIR``), checked against the VAE ``record`` (hash, codebook
    and the grid of ``record["level"]``). Batches ``(codes, y)``; a bottom prior's
    ``(bottom, y, top)``. Also whether val is non-empty."""
    if not isinstance(source, ImageSplits):
        level = record.get("level")
        source = stream_splits(DataConfig(name="stream", path=str(source), level=level), True)
    check_code_shards(source, record)
    dm = SplitsDataModule(source.train, source.val, source.test, batch_size, num_workers, seed)
    return dm, len(source.val) > 0  # type: ignore[arg-type]


def condition_codes(dm: SplitsDataModule, has_val: bool, n: int) -> torch.Tensor:
    """A bottom prior's sample grids: the top codes long [<= n, h, w] of the first val items
    (train when val is empty) of a :func:`shard_codes_datamodule` ``(bottom, y, top)``."""
    ds = dm.val_set if has_val else dm.train_set
    return torch.stack([ds[i][2] for i in range(min(n, len(ds)))])  # type: ignore[arg-type]
