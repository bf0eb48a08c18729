"""Exact resume: a run SIGKILLed mid-training and rerun ends bit-identical to an uninterrupted one.

Also the pieces: the seeded batch stream, the step Lightning restores before iterating the
training loader, and the RNG states stored in checkpoints.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqprior.train.config import DeviceOptions
from vqprior.train.datamodule import SplitsDataModule
from vqprior.train.resume import StreamBatchSampler, capture_rng, restore_rng
from vqprior.train.stages import train_vae

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CPU = DeviceOptions(accelerator="cpu", devices="1", progress=False)
DEV = ["--accelerator", "cpu", "--devices", "1"]

# The CLI, with each training step slowed down so that a kill lands mid-run.
CHILD = """
import sys, time
from vqprior.train.prior import PriorModule
from vqprior.train.vae import VQVAEModule

delay = float(sys.argv[1])
for cls in (VQVAEModule, PriorModule):
    def slow(self, batch, batch_idx, _step=cls.training_step):
        time.sleep(delay)
        return _step(self, batch, batch_idx)
    cls.training_step = slow
from vqprior.cli import main
main(sys.argv[2:])
"""


def launch(args: list[str], delay: float = 0.0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}  # two runs, two cores
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(delay), *args, *DEV],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def finish(proc: subprocess.Popen[bytes]) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]


def kill_after_checkpoint(proc: subprocess.Popen[bytes], ckpt_dir: Path, min_step: int) -> None:
    """SIGKILL ``proc`` at a random moment after a checkpoint of step >= ``min_step`` exists."""
    deadline = time.time() + 90
    while not any(int(p.stem.split("=")[1]) >= min_step for p in ckpt_dir.glob("step=*.ckpt")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(random.Random(min_step).uniform(0.0, 0.08))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # it was still running: really interrupted


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def train_losses(out: Path) -> dict[int, str]:
    with open(out / "metrics.csv", newline="") as fh:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(fh) if r.get("train/loss")}


def check_killed_run_resumes_exactly(tmp_path: Path, args: list[str], max_steps: int) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    uninterrupted = launch([*args, "--out", str(ref)])
    killed = launch([*args, "--out", str(run)], delay=0.05)
    kill_after_checkpoint(killed, run / "checkpoints", min_step=max_steps // 3)
    finish(uninterrupted)
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < max_steps
    assert not (run / "model").exists()
    stale = run / "checkpoints" / ".last.ckpt.deadbeef.tmp"  # as a kill mid-save leaves it
    stale.write_bytes(b"half a checkpoint")
    finish(launch([*args, "--out", str(run)]))  # the same command again
    assert not stale.exists()
    assert_same_weights(ref, run)
    losses, ref_losses = train_losses(run), train_losses(ref)
    resumed = [s for s in losses if s >= step]
    assert resumed and all(losses[s] == ref_losses[s] for s in resumed)


def test_killed_train_vae_resumes_bit_identical(tmp_path: Path) -> None:
    """Dead-code restarts draw from the global RNG at every step; 4 batches an epoch."""
    args = ["train-vae", "--config", str(TINY / "vae.yaml")]
    sets = ["max_steps=15", "ckpt_every_n_steps=2", "val_every_n_steps=5", "image_every_n_steps=4"]
    check_killed_run_resumes_exactly(tmp_path, [*args, *[f"--set=train.{s}" for s in sets]], 15)


def test_killed_pixel_prior_with_dropout_and_ema_resumes_bit_identical(tmp_path: Path) -> None:
    args = ["train-prior", "--config", str(TINY / "prior_pixels.yaml")]
    sets = [
        "model.backbone=pixelcnnpp",
        "model.dropout=0.5",
        "model.nr_resnet=1",
        "model.num_scales=2",
        "train.max_steps=12",
        "train.ckpt_every_n_steps=2",
        "train.val_every_n_steps=4",
        "train.image_every_n_steps=0",  # sampling is slow; grids keep the RNG: see below
    ]
    check_killed_run_resumes_exactly(tmp_path, [*args, *[f"--set={s}" for s in sets]], 12)


# ---- the pieces -------------------------------------------------------------------------


def global_batch(sampler: StreamBatchSampler, g: int) -> list[int]:
    """Reference: this rank's part of global batch ``g`` of the stream (epoch, then slice)."""
    epoch, j = divmod(g, len(sampler))
    return sampler.rank_batch(sampler.permutation(epoch), j)


@pytest.mark.parametrize("n, batch, world", [(64, 16, 1), (70, 8, 2), (10, 4, 3), (5, 16, 2)])
def test_stream_is_seeded_permutations_sliced_by_step_and_rank(
    n: int, batch: int, world: int
) -> None:
    ranks = [StreamBatchSampler(n, batch, seed=7, rank=r, world_size=world) for r in range(world)]
    per_epoch = len(ranks[0])
    assert per_epoch == max(1, n // (batch * world))
    for epoch in range(3):
        perm = ranks[0].permutation(epoch)
        assert sorted(perm.tolist()) == list(range(n))
        seen: list[int] = []
        for j in range(per_epoch):
            parts = [global_batch(s, epoch * per_epoch + j) for s in ranks]
            assert all(parts) and sum(len(p) for p in parts) == min(n, batch * world)
            seen += [i for p in parts for i in p]
        assert len(set(seen)) == len(seen)  # no item twice in an epoch
        assert seen == perm[: len(seen)].tolist()  # the epoch's permutation, in order
    assert not torch.equal(ranks[0].permutation(0), ranks[0].permutation(1))
    other = StreamBatchSampler(n, batch, seed=8, rank=0, world_size=world)
    assert not torch.equal(other.permutation(0), ranks[0].permutation(0))


def test_each_iter_starts_at_the_position_and_ends_with_its_epoch() -> None:
    where = {"step": 0}
    sampler = StreamBatchSampler(50, 8, seed=3, position=lambda: where["step"])  # 6 per epoch
    stream = [global_batch(sampler, g) for g in range(20)]
    for start in (0, 4, 6, 13):
        where["step"] = start
        end = (start // 6 + 1) * 6
        assert list(sampler) == stream[start:end]
    free = StreamBatchSampler(50, 8, seed=3)  # no position: epoch after epoch
    assert list(free) + list(free) == stream[:12]


class _Killed(Exception):
    pass


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 5:
            raise _Killed  # stands in for a kill between checkpoints


def test_lightning_restores_the_step_before_it_iterates_the_training_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = yaml.safe_load((TINY / "vae.yaml").read_text())
    cfg["train"].update(max_steps=10, ckpt_every_n_steps=3, val_every_n_steps=100)
    with pytest.raises(_Killed):
        train_vae(cfg, tmp_path, CPU, callbacks=[_Crash()])
    seen: list[tuple[str, int]] = []
    make = SplitsDataModule.train_sampler

    def recording(self: SplitsDataModule) -> StreamBatchSampler:
        assert self.trainer is not None
        seen.append(("train_dataloader", self.trainer.global_step))
        sampler = make(self)
        position = sampler.position
        assert position is not None
        sampler.position = lambda: seen.append(("iter", position())) or position()  # type: ignore[func-returns-value]
        return sampler

    monkeypatch.setattr(SplitsDataModule, "train_sampler", recording)
    assert train_vae(cfg, tmp_path, CPU)["global_step"] == 10
    # restored step 3 before train_dataloader(); then epochs start at steps 4 and 8
    assert seen == [("train_dataloader", 3), ("iter", 3), ("iter", 4), ("iter", 8)]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save({"rng": state}, tmp_path / "s.ckpt")
    loaded = torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"]
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    restore_rng(loaded)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_image_grids_leave_the_global_rng_as_they_found_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vqprior.train.callbacks import ImageGrids

    def make(module: L.LightningModule) -> tuple[torch.Tensor, int]:
        return torch.rand(2, 1, 4, 4) * 2 - 1, 2  # draws from the global RNG

    grids = ImageGrids(tmp_path, "x", make, every_n_steps=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    grids._write(SimpleNamespace(global_step=1), L.LightningModule())  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected)
    assert (tmp_path / "x_step0000001.png").is_file()
