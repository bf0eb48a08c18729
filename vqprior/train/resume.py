"""Exact resume: a data order that is a function of (seed, step), and RNG states in checkpoints.

Lightning 2.6 restores weights, optimizers, schedulers and loop counters, but neither the
global RNG nor a DataLoader's place inside an epoch. Here:

- :class:`StreamBatchSampler` makes the training batches an endless stream of seeded
  per-epoch permutations; each ``iter()`` starts at the trainer's (restored) ``global_step``,
  so a resumed run sees the very batches an uninterrupted one would. Under DDP each rank
  takes its part of every global batch (use the Trainer with ``use_distributed_sampler=False``).
- :class:`ResumeState` stores the torch (and CUDA, Python, NumPy) RNG states in every
  checkpoint and puts them back just before training continues. Lightning runs callbacks'
  ``on_train_batch_end`` (where checkpoints are saved) before the LightningModule's own, so a
  mid-run checkpoint precedes that hook for its last batch (the prior's EMA update): the
  resumed run calls it once, so its effect is not lost.

Bit-identical on CPU; on GPU as deterministic as the kernels. Randomness inside DataLoader
workers (none in vqprior's datasets) is not covered.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (seed, epoch) -> distinct generator seeds


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's permutation (a 63-bit function of seed and epoch)."""
    return (seed * _SEED_MIX + epoch + 1) % (2**63 - 1)


class StreamBatchSampler(Sampler[list[int]]):
    """This rank's batches of a seeded, endless stream of per-epoch permutations.

    With ``n`` items, per-rank batch size ``B`` and ``W`` ranks, an epoch has
    ``E = max(1, n // (B W))`` global batches (a short tail is dropped). Global batch ``g``
    is slice ``[j B W, (j + 1) B W)`` of permutation ``e`` of ``range(n)``, where
    ``e, j = divmod(g, E)`` and the permutation is drawn from a generator seeded by
    :func:`epoch_seed`; rank ``r`` takes its ``r``-th equal part (all ``n`` items split over
    the ranks when ``n < B W``). Every ``iter()`` starts at global batch ``position()`` (the
    trainer's global step, one optimizer step per batch; without it, where the previous
    ``iter()`` stopped) and runs to the end of that epoch, so ``len()`` is ``E``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: Callable[[], int] | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if num_items < world_size:
            raise ValueError(
                f"{num_items} training examples cannot feed {world_size} processes: "
                "use more data or fewer devices"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._next = 0  # global batch after the last epoch iterated (without ``position``)

    def __len__(self) -> int:
        return max(1, self.num_items // (self.batch_size * self.world_size))

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of all items: long [n]."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=gen)

    def rank_batch(self, perm: torch.Tensor, j: int) -> list[int]:
        """This rank's part of global batch ``j`` of an epoch with permutation ``perm`` [n]."""
        size = self.batch_size * self.world_size
        glob = perm[j * size : (j + 1) * size] if self.num_items >= size else perm
        return glob.tensor_split(self.world_size)[self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        start = self.position() if self.position is not None else self._next
        epoch, first = divmod(start, len(self))
        perm = self.permutation(epoch)
        for j in range(first, len(self)):
            yield self.rank_batch(perm, j)
        self._next = (epoch + 1) * len(self)


class ShardBatchSampler(Sampler[list[int]]):
    """Evaluation batches, in order, of this rank's share ``range(rank, n, world_size)``."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_items, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU, this CUDA device when in use, Python, NumPy).

    Plain tensors, ints and tuples only, so a checkpoint holding them loads with
    ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (CUDA only when both sides use it)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Nested lists -> tuples (random.setstate wants the tuples getstate gave)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class ResumeState(Callback):
    """Checkpoints the global RNG states and makes a resumed run continue exactly.

    ``state_dict`` (saved in every checkpoint) holds :func:`capture_rng` and whether the save
    happened inside ``on_train_batch_end`` (before the LightningModule's own hook for that
    batch). On resume, the module's ``on_train_batch_end(None, None, -1)`` is replayed once at
    ``on_fit_start`` (when the save preceded it) and the RNG states are restored at
    ``on_train_start``, the last hook before training continues.
    """

    def __init__(self) -> None:
        self._in_batch_end = False
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "vqprior.ResumeState"

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng(), "module_batch_end_pending": self._in_batch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None and self._loaded.pop("module_batch_end_pending", False):
            logger.debug(
                "replaying the module's on_train_batch_end of step %d", trainer.global_step
            )
            pl_module.on_train_batch_end(None, None, -1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_fit_start(trainer, pl_module)  # strategies that restore after setup
        if self._loaded is not None:
            restore_rng(self._loaded["rng"])
            self._loaded = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._in_batch_end = False

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._in_batch_end = True  # checkpoint callbacks run after this one

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_batch_end = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_batch_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_batch_end = False
