"""Tests for vqprior.data: sources, splits, error messages, code files and image grids."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from einops import rearrange
from PIL import Image

from vqprior.artifacts import (
    CodesDataset,
    image_grid,
    load_codes,
    save_codes,
    save_image_grid,
    upscale,
)
from vqprior.config import ConfigError
from vqprior.data import (
    DataConfig,
    DataError,
    float_to_uint8,
    load_image_splits,
    split_indices,
    uint8_to_float,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _on_grid(x: torch.Tensor) -> bool:
    levels = (x.double() + 1) * 255 / 2
    return bool(((levels - levels.round()).abs() < 1e-4).all())


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- conversion and config


def test_uint8_float_round_trip_all_levels() -> None:
    v = torch.arange(256, dtype=torch.uint8)
    f = uint8_to_float(v)
    assert f.dtype == torch.float32
    assert f[0] == -1 and f[-1] == 1
    torch.testing.assert_close(f, 2 * v.double().float() / 255 - 1)
    assert torch.equal(float_to_uint8(f), v)
    with pytest.raises(ValueError, match="uint8"):
        uint8_to_float(v.float())


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "imagenet"}, "name"),
        ({"name": "folder"}, "path"),
        ({"channels": 2}, "channels"),
        ({"image_size": 0}, "image_size"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
        ({"limit": 0}, "limit"),
        ({"name": "stream"}, "shard directory"),
        ({"name": "stream", "path": "shards", "limit": 5}, "limit"),
        ({"augment": "vflip"}, "augment"),
        ({"name": "stream", "path": "shards", "augment": "hflip"}, "augment"),
    ],
)
def test_config_rejects_bad_fields(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DataConfig.from_dict(changes)


def test_config_yaml_round_trip() -> None:
    cfg = DataConfig(name="npz", path="a.npz", image_size=16, channels=3, limit=5)
    assert DataConfig.from_yaml(cfg.to_yaml()) == cfg


def test_stream_splits_fixed_by_the_shards_and_litdata_imported_lazily(tmp_path: Path) -> None:
    """data.name=stream (tests/test_streaming.py reads real shards): a missing directory is
    one DataError line; vqprior.data and vqprior.streaming import no litdata."""
    with pytest.raises(DataError, match="not found"):
        load_image_splits(DataConfig(name="stream", path=str(tmp_path / "none")))
    code = "import sys, vqprior.data, vqprior.streaming; print('litdata' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


# ---------------------------------------------------------------- digits and splits


def test_digits_shapes_values_and_labels() -> None:
    from sklearn.datasets import load_digits

    splits = load_image_splits(DataConfig())
    assert (splits.channels, splits.height, splits.width, splits.num_classes) == (1, 8, 8, 10)
    ref = load_digits()
    for part in (splits.train, splits.val, splits.test):
        x, y = _stack(part)
        assert x.dtype == torch.float32 and y.dtype == torch.long
        assert x.shape[1:] == (1, 8, 8) and y.shape == (len(part),)
        assert x.min() >= -1 and x.max() <= 1 and _on_grid(x)
        idx = torch.tensor(part.indices)  # type: ignore[attr-defined]
        expected = np.rint(ref.images[idx.numpy()] * 255 / 16)
        assert np.array_equal(((x[:, 0].double() + 1) * 255 / 2).round().numpy(), expected)
        assert torch.equal(y, torch.as_tensor(ref.target[idx.numpy()]))
    x, _ = _stack(splits.train)
    assert x.min() == -1 and x.max() == 1  # 0 and 16 both occur


def test_digits_split_deterministic_disjoint_covering() -> None:
    def indices(seed: int) -> list[list[int]]:
        s = load_image_splits(DataConfig(split_seed=seed))
        return [list(p.indices) for p in (s.train, s.val, s.test)]  # type: ignore[attr-defined]

    a, b, c = indices(0), indices(0), indices(1)
    assert a == b and a != c
    for parts in (a, c):
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) == 1797 and set(flat) == set(range(1797))
        assert [len(p) for p in parts] == [1797 - 2 * 180, 180, 180]


def test_split_indices_fractions_and_errors() -> None:
    tr, va, te = split_indices(10, 0.2, 0.0, seed=3)
    assert (len(tr), len(va), len(te)) == (8, 2, 0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(10))
    with pytest.raises(DataError, match="none for training"):
        split_indices(2, 0.5, 0.4, seed=0)


def test_digits_limit_resize_and_channels() -> None:
    s = load_image_splits(DataConfig(limit=50, image_size=16, channels=3))
    assert len(s.train) == 50 and len(s.val) == 180
    assert (s.channels, s.height, s.width) == (3, 16, 16)
    x, _ = _stack(s.val)
    assert x.shape[1:] == (3, 16, 16) and _on_grid(x) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray -> RGB
    full = load_image_splits(DataConfig())
    assert set(s.train.indices) <= set(full.train.indices)  # type: ignore[attr-defined]


def test_hflip_adds_the_mirror_image_of_every_training_image_only() -> None:
    plain = load_image_splits(DataConfig(limit=40))
    s = load_image_splits(DataConfig(limit=40, augment="hflip"))
    assert len(s.train) == 80 and len(s.val) == len(plain.val) and len(s.test) == len(plain.test)
    x, y = _stack(s.train)
    x0, y0 = _stack(plain.train)
    assert torch.equal(x[:40], x0) and torch.equal(y[:40], y0) and torch.equal(y[40:], y0)
    for i in (0, 17, 39):  # column j of the mirror is column W - 1 - j of the image
        assert torch.equal(x[40 + i], x0[i][..., torch.arange(x0.shape[-1] - 1, -1, -1)])
    assert not torch.equal(x[40:], x0)  # digits are not symmetric: a real change
    assert torch.equal(s.train[-1][0], x[79]) and torch.equal(s.train[-80][0], x[0])
    with pytest.raises(IndexError):
        s.train[80]


# ---------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    x = gen.integers(0, 256, size=(20, 5, 6, 3), dtype=np.uint8)
    y = gen.integers(0, 4, size=20).astype(np.uint8)
    y[0] = 6
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_image_splits(DataConfig(name="npz", path=str(tmp_path / "d.npz"), val_fraction=0.2))
    assert (s.channels, s.height, s.width, s.num_classes) == (3, 5, 6, 7)
    seen = []
    for part in (s.train, s.val, s.test):
        xs, ys = _stack(part)
        idx = list(part.indices)  # type: ignore[attr-defined]
        seen += idx
        assert np.array_equal(rearrange(float_to_uint8(xs), "n c h w -> n h w c").numpy(), x[idx])
        assert np.array_equal(ys.numpy(), y[idx].astype(np.int64))
    assert sorted(seen) == list(range(20))


def test_npz_grayscale_unlabelled_to_rgb(tmp_path: Path) -> None:
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "g.npz", x=x)
    cfg = DataConfig(name="npz", path=str(tmp_path / "g.npz"), val_fraction=0, test_fraction=0)
    s = load_image_splits(cfg.replace(channels=3))
    xs, ys = _stack(s.train)
    assert s.num_classes == 0 and (ys == -1).all() and xs.shape == (4, 3, 3, 3)
    assert torch.equal(float_to_uint8(xs[:, 2]), torch.as_tensor(x))


def test_npz_rgb_to_grayscale_luma(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x=x)
    cfg = DataConfig(name="npz", path=str(tmp_path / "c.npz"), val_fraction=0, test_fraction=0)
    s = load_image_splits(cfg.replace(channels=1))
    xs, _ = _stack(s.train)
    assert s.channels == 1 and xs.shape == (6, 1, 4, 4)
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL
    assert np.abs(float_to_uint8(xs[:, 0]).numpy() - luma).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 4, 4, 3), np.float32)}, r"float32 values in \[0, 0\]"),
        ({"x": np.array(["a", "b"])}, "expected uint8 0..255"),
        ({"x": np.zeros((2, 4), np.uint8)}, "shape"),
        ({"x": np.zeros((2, 4, 4, 5), np.uint8)}, "shape"),
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "no array 'x'"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "y must be"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.float32)}, "y must be"),
    ],
)
def test_npz_bad_contents(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_image_splits(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))


@pytest.mark.parametrize(
    ("x", "fix"),
    [
        (np.linspace(0, 1, 32, dtype=np.float32), "np.round(x * 255)"),
        (np.linspace(-1, 1, 32), "np.round((x + 1) * 127.5)"),
        (np.linspace(0, 255, 32), "np.round(x)"),
        (np.linspace(-3, 300, 32), "x rescaled to 0..255"),
        (np.arange(32) * 10, "x rescaled to 0..255"),
    ],
)
def test_npz_of_other_ranges_names_the_expected_range(tmp_path: Path, x: Any, fix: str) -> None:
    np.savez(tmp_path / "f.npz", x=x.reshape(2, 4, 4))
    with pytest.raises(DataError) as err:
        load_image_splits(DataConfig(name="npz", path=str(tmp_path / "f.npz")))
    line = str(err.value)
    assert "\n" not in line and "uint8 0..255" in line and "[-1, 1]" in line
    assert f"save x as {fix}.astype(np.uint8)" in line


def test_npz_integers_in_range_load_as_their_uint8_values(tmp_path: Path) -> None:
    x = np.arange(32, dtype=np.int64).reshape(2, 4, 4) * 8
    np.savez(tmp_path / "i.npz", x=x)
    cfg = DataConfig(name="npz", path=str(tmp_path / "i.npz"), val_fraction=0, test_fraction=0)
    xs, _ = _stack(load_image_splits(cfg).train)
    assert np.array_equal(float_to_uint8(xs[:, 0]).numpy(), x)


def test_npz_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image_splits(DataConfig(name="npz", path=str(tmp_path / "nope.npz")))
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "one.npy", np.zeros((3, 4, 4), np.uint8))
    cases = [("junk.npz", b"not an npz"), ("cut.npz", good.read_bytes()[:40])]
    cases.append(("one.npy", (tmp_path / "one.npy").read_bytes()))
    for name, data in cases:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name):
            load_image_splits(DataConfig(name="npz", path=str(tmp_path / name)))


# ---------------------------------------------------------------- folder


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    arrays = {}
    for cls, value in [("cat", 10), ("ant", 200)]:
        (tmp_path / cls).mkdir()
        for k in range(3):
            arr = np.full((6, 5, 3), value + k, np.uint8)
            arr[0, 0] = (1, 2, 3)
            Image.fromarray(arr).save(tmp_path / cls / f"{k}.png")
            arrays[(cls, k)] = arr
    cfg = DataConfig(name="folder", path=str(tmp_path), val_fraction=0, test_fraction=0)
    s = load_image_splits(cfg)
    assert (s.channels, s.height, s.width, s.num_classes) == (3, 6, 5, 2)
    xs, ys = _stack(s.train)
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]  # ant=0, cat=1 (sorted class names)
    for i, key in enumerate([("ant", k) for k in range(3)] + [("cat", k) for k in range(3)]):
        assert np.array_equal(
            rearrange(float_to_uint8(xs[i]), "c h w -> h w c").numpy(), arrays[key]
        )
    gray = load_image_splits(cfg.replace(channels=1, image_size=4))
    xg, _ = _stack(gray.train)
    assert xg.shape == (6, 1, 4, 4) and _on_grid(xg) and gray.height == gray.width == 4


def test_folder_without_subfolders_is_unlabelled(tmp_path: Path) -> None:
    for k in range(4):
        Image.fromarray(np.full((3, 3), 60 * k, np.uint8)).save(tmp_path / f"img{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="folder", path=str(tmp_path), val_fraction=0.25, test_fraction=0)
    s = load_image_splits(cfg)
    assert (s.channels, s.height, s.width, s.num_classes) == (1, 3, 3, 0)
    assert len(s.train) + len(s.val) == 4 and len(s.test) == 0
    xs, ys = _stack(s.train)
    assert (ys == -1).all() and xs.shape[1:] == (1, 3, 3)
    values = {int(float_to_uint8(x)[0, 0, 0]) for x in xs}
    assert values <= {0, 60, 120, 180}


def test_folder_corrupt_image_names_file(tmp_path: Path) -> None:
    png = _png_bytes(np.full((8, 8, 3), 7, np.uint8))
    (tmp_path / "a_good.png").write_bytes(png)
    (tmp_path / "b_truncated.png").write_bytes(png[: len(png) // 2])
    cfg = DataConfig(name="folder", path=str(tmp_path), val_fraction=0, test_fraction=0)
    s = load_image_splits(cfg)  # validated lazily: the first image is fine
    assert s.train[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="b_truncated.png"):
        s.train[1]
    (tmp_path / "0_garbage.png").write_bytes(b"garbage, not a png")
    with pytest.raises(DataError, match="0_garbage.png"):
        load_image_splits(cfg)


def test_folder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 4), np.uint8)).save(tmp_path / "b.png")
    cfg = DataConfig(name="folder", path=str(tmp_path), val_fraction=0, test_fraction=0)
    with pytest.raises(DataError, match="image_size"):
        _stack(load_image_splits(cfg).train)
    assert _stack(load_image_splits(cfg.replace(image_size=4)).train)[0].shape == (2, 1, 4, 4)


def test_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image_splits(DataConfig(name="folder", path=str(tmp_path / "none")))
    with pytest.raises(DataError, match="no images"):
        load_image_splits(DataConfig(name="folder", path=str(tmp_path)))


# ---------------------------------------------------------------- torchvision sets


def test_mnist_offline_missing_root(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist", root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError) as info:
        load_image_splits(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "MNIST" in msg and str(tmp_path / "nowhere" / "MNIST" / "raw") in msg


@pytest.mark.parametrize(
    "error",
    [urllib.error.URLError("no network"), RuntimeError("Error downloading train-images\nTried x")],
)
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_download_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, name: str
) -> None:
    calls = []

    def offline(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        raise error

    for cls in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, cls, offline)
    with pytest.raises(DataError, match="download failed") as info:
        load_image_splits(DataConfig(name=name, root=str(tmp_path)))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert calls[0]["download"] is True


@pytest.mark.data
def test_real_mnist_offline() -> None:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data/MNIST absent")
    s = load_image_splits(
        DataConfig(name="mnist", root=str(SHARED_DATA), download=False, limit=100)
    )
    assert (s.channels, s.height, s.width, s.num_classes) == (1, 28, 28, 10)
    assert len(s.train) == 100 and len(s.val) == 6000 and len(s.test) == 10000
    x, y = s.test[0]
    assert x.shape == (1, 28, 28) and _on_grid(x) and int(y) == 7  # the first test digit is a 7
    xs, ys = _stack(torch.utils.data.Subset(s.val, range(200)))
    assert xs.min() == -1 and xs.max() == 1 and set(ys.tolist()) == set(range(10))


# ---------------------------------------------------------------- code maps


def test_codes_round_trip_metadata_and_atomicity(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (7, 4, 5), generator=gen)
    labels = torch.randint(-1, 10, (7,), generator=gen)
    meta = {"vae_hash": "abc123", "num_codes": "512"}
    path = tmp_path / "sub" / "codes.safetensors"
    save_codes(path, codes, labels, meta)
    c2, l2, m2 = load_codes(path)
    assert c2.dtype == l2.dtype == torch.long
    assert torch.equal(c2, codes) and torch.equal(l2, labels) and m2 == meta
    assert os.listdir(path.parent) == ["codes.safetensors"]
    ds = CodesDataset.from_file(path)
    assert len(ds) == 7 and ds.meta == meta
    c, y = ds[3]
    assert torch.equal(c, codes[3]) and y.dtype == torch.long and y.ndim == 0 and y == labels[3]


def test_codes_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "codes.safetensors"
    save_codes(path, torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_codes(path, torch.ones(2, 3, 3, dtype=torch.long), torch.ones(2, dtype=torch.long))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["codes.safetensors"]


def test_codes_missing_corrupt_and_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_codes(tmp_path / "none.safetensors")
    altered = tmp_path / "altered.safetensors"  # range-checked once at load, not per step
    save_codes(altered, torch.tensor([[[0, 8]]]), torch.zeros(1, dtype=torch.long),
               {"num_codes": "8"})  # fmt: skip
    with pytest.raises(DataError, match=r"outside \[0, 8\)"):
        load_codes(altered)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_codes(bad)
    with pytest.raises(DataError, match="codes must be integers"):
        save_codes(tmp_path / "f.safetensors", torch.zeros(2, 3, 3), torch.zeros(2))
    with pytest.raises(DataError, match="labels"):
        save_codes(
            tmp_path / "f.safetensors", torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(3)
        )
    unlabelled = CodesDataset(torch.zeros(2, 3, 3, dtype=torch.long))
    assert unlabelled[1][1] == -1


# ---------------------------------------------------------------- image grids


@pytest.mark.parametrize(("b", "c", "nrow"), [(5, 3, 2), (3, 1, 8), (4, 3, 4)])
def test_image_grid_layout(b: int, c: int, nrow: int) -> None:
    gen = torch.Generator().manual_seed(b)
    v = torch.randint(1, 256, (b, c, 4, 6), generator=gen, dtype=torch.uint8)
    grid = image_grid(uint8_to_float(v), nrow=nrow, padding=2)
    ncol, rows = min(nrow, b), -(-b // min(nrow, b))
    assert grid.dtype == torch.uint8 and grid.shape == (rows * 6 + 2, ncol * 8 + 2, c)
    covered = torch.zeros(grid.shape[:2], dtype=torch.bool)
    for k in range(b):
        r, q = divmod(k, ncol)
        tile = grid[2 + r * 6 : 2 + r * 6 + 4, 2 + q * 8 : 2 + q * 8 + 6]
        assert torch.equal(tile, rearrange(v[k], "c h w -> h w c"))
        covered[2 + r * 6 : 2 + r * 6 + 4, 2 + q * 8 : 2 + q * 8 + 6] = True
    assert (grid[~covered] == 0).all()  # padding and blank slots are black


@pytest.mark.parametrize("c", [1, 3])
def test_save_image_grid_png(tmp_path: Path, c: int) -> None:
    gen = torch.Generator().manual_seed(c)
    x = uint8_to_float(torch.randint(0, 256, (3, c, 5, 5), generator=gen, dtype=torch.uint8))
    path = tmp_path / "grid.png"
    save_image_grid(path, x, nrow=2)
    with Image.open(path) as im:
        png = np.asarray(im)
    big = upscale(x, 32)  # 5x5 images are shown 7 times larger (35 px)
    assert big.shape == (3, c, 35, 35)
    assert np.array_equal(png.reshape(*png.shape[:2], -1), image_grid(big, 2).numpy())
    assert os.listdir(tmp_path) == ["grid.png"]


def test_upscale_is_nearest_neighbour_to_at_least_min_size() -> None:
    x = torch.randn(2, 3, 8, 6)
    big = upscale(x, 32)  # the smaller side 6 -> 36 (s = 6)
    assert big.shape == (2, 3, 48, 36)
    for i in range(8):
        for j in range(6):
            block = big[..., 6 * i : 6 * i + 6, 6 * j : 6 * j + 6]
            assert torch.equal(block, x[..., i : i + 1, j : j + 1].expand_as(block))
    assert upscale(x, 4) is x
