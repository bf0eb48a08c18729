"""LightningDataModules over vqprior.data's plain datasets (images or code maps)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vqprior.data import CodesDataset, ImageSplits


class SplitsDataModule(L.LightningDataModule):
    """Train/val/test datasets of ``(x, y)`` items -> DataLoaders (train shuffled)."""

    def __init__(
        self,
        train: Dataset[Any],
        val: Dataset[Any],
        test: Dataset[Any],
        batch_size: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.num_workers = batch_size, num_workers

    def _loader(self, ds: Dataset[Any], shuffle: bool) -> DataLoader[Any]:
        n = len(ds)  # type: ignore[arg-type]
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and n >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)


def image_datamodule(
    splits: ImageSplits, batch_size: int, num_workers: int = 0
) -> SplitsDataModule:
    """Images: items (x float [c, H, W] in [-1, 1], y long)."""
    return SplitsDataModule(splits.train, splits.val, splits.test, batch_size, num_workers)


def codes_datamodule(
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int, num_workers: int = 0
) -> SplitsDataModule:
    """Code maps: ``codes[split] = (codes long [N, h, w], labels long [N])``."""
    sets = {k: CodesDataset(c, y) for k, (c, y) in codes.items()}
    return SplitsDataModule(sets["train"], sets["val"], sets["test"], batch_size, num_workers)
