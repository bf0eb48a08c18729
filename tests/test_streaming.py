"""Streaming shards (litdata): `vqprior shard`, `data.name: stream`, `encode --format shards`.

Shards read back exactly what the in-memory path reads; under DDP (2 gloo ranks) training
sees every image once per epoch across the ranks; encoded code shards equal ``encode_codes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from lightning.pytorch.callbacks import Callback

pytest.importorskip("litdata")

from vqprior.artifacts import load_codes  # noqa: E402
from vqprior.cli import cli  # noqa: E402
from vqprior.config import ConfigError  # noqa: E402
from vqprior.data import DataConfig, DataError, float_to_uint8, load_image_splits  # noqa: E402
from vqprior.models.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from vqprior.streaming import ShardDataset, encode_shards, stream_splits  # noqa: E402
from vqprior.train.codes import encode_codes, load_vae, vae_record  # noqa: E402
from vqprior.train.datamodule import SplitsDataModule, shard_codes_datamodule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, TRAIN = 240, 192  # 24 val, 24 test: 12 steps of 2 ranks x 8 per epoch
SPLIT = {"val_fraction": 0.1, "test_fraction": 0.1}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N distinct random 8x8 RGB images with labels 0..4, as an .npz."""
    path = tmp_path_factory.mktemp("src") / "images.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N, 8, 8, 3), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 5, size=N))
    return path


@pytest.fixture(scope="module")
def shards(source: Path) -> Path:
    """`vqprior shard` of the source, in chunks of a few images."""
    out = source.parent / "shards"
    args = ["shard", str(source), "-o", str(out), "--val-fraction", "0.1", "--chunk-bytes", "4KB"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["train"] == TRAIN
    assert len(list((out / "train").glob("chunk-*.bin"))) > 4  # several chunks to shuffle
    return out


def _hash(img: torch.Tensor) -> bytes:
    return float_to_uint8(img).numpy().tobytes()


def test_shards_read_back_the_in_memory_splits(source: Path, shards: Path) -> None:
    import litdata

    memory = load_image_splits(DataConfig(name="npz", path=str(source), **SPLIT))
    stream = load_image_splits(DataConfig(name="stream", path=str(shards)))
    assert tuple(stream[3:]) == tuple(memory[3:]) == (3, 8, 8, 5)
    for split in ("train", "val", "test"):
        mem, st = getattr(memory, split), getattr(stream, split)
        assert isinstance(st, ShardDataset) and len(st) == len(mem)
        raw = litdata.StreamingDataset(str(shards / split))
        indices = []
        for j in range(len(st)):
            item, (x, y) = raw[j], st[j]
            i = item["index"]  # the item's place in the in-memory split
            mx, my = mem[i]
            assert torch.equal(item["image"], float_to_uint8(mx)) and item["label"] == int(my)
            assert torch.equal(x, mx) and y.dtype == torch.long and int(y) == int(my)
            indices.append(i)
        assert sorted(indices) == list(range(len(mem)))
        # val and test keep their order; train is written shuffled (chunks mix the classes)
        assert (indices == list(range(len(mem)))) == (split != "train")
    resized = stream_splits(DataConfig(name="stream", path=str(shards), image_size=4, channels=1))
    memory4 = load_image_splits(
        DataConfig(name="npz", path=str(source), image_size=4, channels=1, **SPLIT)
    )
    assert resized[3:6] == (1, 4, 4)
    assert torch.equal(resized.val[3][0], memory4.val[3][0])


def test_shard_errors(source: Path, shards: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["shard", str(source), "-o", str(shards)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(cli, ["shard", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not found" in result.output
    with pytest.raises(DataError, match="holds no litdata shards"):
        load_image_splits(DataConfig(name="stream", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="limit"):
        DataConfig(name="stream", path=str(shards), limit=10)
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind


LAUNCH = """
import hashlib, json, sys
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from vqprior.data import float_to_uint8
from vqprior.train.config import DeviceOptions
from vqprior.train.stages import train_vae

shards, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


class Record(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append([float_to_uint8(x).numpy().tobytes().hex() for x in batch[0]])

    def on_train_end(self, trainer, module):
        (out / f"seen{trainer.global_rank}.json").write_text(json.dumps(self.seen))


cfg = {
    "model": {"hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1, "downsample": 2,
              "num_codes": 16, "code_dim": 4},
    "data": {"name": "stream", "path": shards},
    "train": {"batch_size": 8, "max_steps": steps, "val_every_n_steps": 12, "val_batches": 1,
              "ckpt_every_n_steps": 100, "log_every_n_steps": 1, "image_every_n_steps": 100,
              "num_sample_images": 4},
}
device = DeviceOptions(accelerator="cpu", devices="2", strategy="ddp", precision="32-true")
train_vae(cfg, out, device, seed=3, callbacks=[Record()])
"""


def test_two_ranks_see_every_image_once_per_epoch(shards: Path, tmp_path: Path) -> None:
    """2 gloo ranks, 2 epochs: each epoch's batches over both ranks hold every train image
    exactly once, in a new order each epoch."""
    launcher, out = tmp_path / "launch.py", tmp_path / "run"
    launcher.write_text(LAUNCH)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    steps = 2 * TRAIN // 16
    proc = subprocess.run(
        [sys.executable, str(launcher), str(shards), str(out), str(steps)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((out / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [steps, steps]
    train = stream_splits(DataConfig(name="stream", path=str(shards))).train
    every = sorted(_hash(train[i][0]).hex() for i in range(len(train)))
    orders = []
    for epoch in range(2):
        steps_of = slice(epoch * steps // 2, (epoch + 1) * steps // 2)
        ranks = [[h for batch in s[steps_of] for h in batch] for s in seen]
        assert not set(ranks[0]) & set(ranks[1])  # disjoint parts
        assert sorted(ranks[0] + ranks[1]) == every  # each image once
        orders.append(ranks[0])
    assert orders[0] != orders[1]  # reshuffled


class _Record(Callback):
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.seen += [_hash(x) for x in batch[0]]


def test_resume_continues_the_stream_where_it_stopped(shards: Path, tmp_path: Path) -> None:
    """Lightning keeps litdata's loader position in the checkpoint: 3 steps, then a resume to 6,
    see the batches of one run of 6 (mid-epoch)."""
    from vqprior.train.config import DeviceOptions
    from vqprior.train.stages import train_vae

    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "vae.yaml").read_text())
    cfg["data"] = {"name": "stream", "path": str(shards)}
    cfg["train"].update(ckpt_every_n_steps=3, image_every_n_steps=100, val_every_n_steps=3)
    device = DeviceOptions(accelerator="cpu", devices="1", precision="32-true", progress=False)
    runs = {}
    for name, steps in (("whole", [6]), ("resumed", [3, 6])):
        runs[name] = _Record()
        for max_steps in steps:
            cfg["train"]["max_steps"] = max_steps
            train_vae(cfg, tmp_path / name, device, seed=1, callbacks=[runs[name]])
    assert len(runs["whole"].seen) == 6 * 16 and runs["resumed"].seen == runs["whole"].seen


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Untrained VAE exports, one and two levels (encoding needs no training)."""
    root = tmp_path_factory.mktemp("vaes")
    small = {"hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1, "code_dim": 4}
    torch.manual_seed(0)
    VQVAE(VQVAEConfig(in_channels=3, downsample=2, num_codes=16, **small)).save_pretrained(
        root / "one"
    )
    two = VQVAEConfig(
        in_channels=3, levels=2, downsample=2, top_downsample=2, num_codes=16, **small
    )
    VQVAE(two).save_pretrained(root / "two")
    return {1: root / "one", 2: root / "two"}


def _check_code_shards(out: Path, files: dict[str, Path], levels: int) -> None:
    """The code shards under ``out`` hold ``encode_codes``'s files: codes, labels, order."""
    names = ("codes",) if levels == 1 else ("top", "bottom")
    for i, name in enumerate(names):
        level = None if levels == 1 else name
        splits = stream_splits(DataConfig(name="stream", path=str(out), level=level), True)
        assert splits.num_classes == 5 and tuple(splits[3:6]) == (3, 8, 8)
        for split in ("train", "val", "test"):
            codes, labels, _ = load_codes(files[f"top/{split}" if name == "top" else split])
            ds = getattr(splits, split)
            items = [ds[j] for j in range(len(ds))]
            assert torch.equal(torch.stack([it[0] for it in items]), codes)
            assert torch.equal(torch.stack([it[1] for it in items]), labels)
            if i == 1:  # the bottom prior's condition: the top codes
                top, _, _ = load_codes(files[f"top/{split}"])
                assert torch.equal(torch.stack([it[2] for it in items]), top)


@pytest.mark.parametrize("levels", [1, 2])
def test_encoded_shards_equal_encode_codes(
    source: Path, vaes: dict[int, Path], tmp_path: Path, levels: int
) -> None:
    data = {"name": "npz", "path": str(source), **SPLIT}
    files = encode_codes(vaes[levels], data, tmp_path / "codes", batch_size=50, device="cpu")
    encode_shards(vaes[levels], data, tmp_path / "shards", batch_size=50, device="cpu")
    _check_code_shards(tmp_path / "shards", files, levels)


def test_encode_format_shards_from_image_shards(
    shards: Path, vaes: dict[int, Path], tmp_path: Path
) -> None:
    """`vqprior encode --format shards` on data.name=stream: the codes encode_codes gives."""
    data = {"name": "stream", "path": str(shards)}
    files = encode_codes(vaes[1], data, tmp_path / "codes", batch_size=50, device="cpu")
    args = ["encode", "--vae", str(vaes[1]), "--out", str(tmp_path / "out"), "--format", "shards"]
    args += ["--set", "data.name=stream", "--set", f"data.path={shards}", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "50"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["train"] == TRAIN
    _check_code_shards(tmp_path / "out", files, 1)


def test_code_shards_datamodule_checks_the_vae(
    source: Path, vaes: dict[int, Path], tmp_path: Path
) -> None:
    data = DataConfig(name="npz", path=str(source), **SPLIT)
    encode_shards(vaes[1], data, tmp_path / "codes", device="cpu")
    vae, export = load_vae(vaes[1])
    record = vae_record(vae, export, (3, 8, 8))
    dm, has_val = shard_codes_datamodule(tmp_path / "codes", record, batch_size=16, seed=0)
    assert isinstance(dm, SplitsDataModule) and has_val
    batches = list(dm.train_dataloader())
    assert len(batches) == TRAIN // 16
    x, y = batches[0]
    assert x.shape == (16, 4, 4) and x.dtype == torch.long and y.shape == (16,)
    with pytest.raises(ValueError, match="different VAE"):
        shard_codes_datamodule(tmp_path / "codes", {**record, "vae_hash": "x"}, batch_size=16)
    with pytest.raises(ConfigError, match="data.level"):
        stream_splits(DataConfig(name="stream", path=str(tmp_path / "codes"), level="top"), True)


@pytest.mark.parametrize(("levels", "via"), [(1, "stream"), (2, "stream"), (1, "--codes")])
def test_train_prior_streams_code_shards(
    source: Path, vaes: dict[int, Path], tmp_path: Path, levels: int, via: str
) -> None:
    """encode --format shards -> train-prior with data.name=stream (or --codes DIR): the prior
    trains on the shards, and its logged val loss is the exported prior's loss on the
    in-memory codes."""
    from vqprior.models.levels import upsample_codes
    from vqprior.models.pixelcnn import PixelCNN
    from vqprior.train.config import DeviceOptions
    from vqprior.train.stages import train_prior

    data = {"name": "npz", "path": str(source), **SPLIT}
    files = encode_codes(vaes[levels], data, tmp_path / "codes", batch_size=50, device="cpu")
    encode_shards(vaes[levels], data, tmp_path / "shards", batch_size=50, device="cpu")
    level = "bottom" if levels == 2 else None
    stream = {"name": "stream", "path": str(tmp_path / "shards"), "level": level}
    cfg = {
        "vae": str(vaes[levels]),
        "data": stream if via == "stream" else data,
        "model": {"channels": 8, "num_layers": 2, "num_classes": "auto"},
        "train": {"max_steps": 3, "batch_size": 16, "val_every_n_steps": 3, "ema_decay": 0.0},
    }
    cpu = DeviceOptions(accelerator="cpu", devices="1", progress=False, precision="32-true")
    shards = tmp_path / "shards" if via == "--codes" else None
    summary = train_prior(cfg, tmp_path / "prior", cpu, codes_dir=shards)
    assert summary["global_step"] == 3
    assert not (tmp_path / "prior" / "codes").exists()  # nothing encoded in memory
    prior = PixelCNN.from_pretrained(tmp_path / "prior" / "model")
    assert prior.config.num_classes == 5  # from the shards' meta
    codes, labels, _ = load_codes(files["val"])
    spatial = None
    if levels == 2:
        vae = VQVAE.from_pretrained(vaes[2])
        top, _, _ = load_codes(files["top/val"])
        spatial = upsample_codes(vae.codebooks[0].embed, top, tuple(codes.shape[1:]))
    with torch.no_grad():
        lp = prior.log_prob(codes, labels, spatial_cond=spatial)  # per image
    nats = (-lp / codes[0].numel()).mean().item()
    assert summary["metrics"]["val/nats_per_code"] == pytest.approx(nats, rel=1e-5)


def test_image_data_refuses_code_shards(
    source: Path, vaes: dict[int, Path], tmp_path: Path
) -> None:
    """Code shards are data for a prior on codes only: train-vae on them is one line."""
    encode_shards(vaes[1], {"name": "npz", "path": str(source), **SPLIT}, tmp_path / "codes")
    args = ["train-vae", "--set", "data.name=stream", "--set", f"data.path={tmp_path / 'codes'}"]
    result = CliRunner().invoke(
        cli, [*args, "--out", str(tmp_path / "vae"), "--accelerator", "cpu"]
    )
    assert result.exit_code != 0
    assert "holds code maps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "vae").exists()
