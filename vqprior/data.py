"""Datasets: digits (embedded), torchvision sets, image folders, ``.npz`` files and streaming
shards (``stream``: litdata's format, larger than memory, see :mod:`vqprior.streaming`).

Every image item is ``(x, y)``: ``x`` float32 ``[c, H, W]`` in [-1, 1] on the 256-level grid
(8-bit value v -> 2v/255 - 1), ``y`` a long scalar label (-1 when unlabelled). Small sets stay
in memory as one uint8 tensor and are converted per item. No Lightning here: the training
layer wraps these plain torch datasets.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from torchvision.transforms.v2 import functional as TF

from vqprior.config import Config, ConfigError, check_choice, check_range

logger = logging.getLogger(__name__)

NUM_LEVELS = 256  # 8-bit pixels
DIGITS_LEVELS = 16  # scikit-learn's digits hold values 0..16
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder", "npz", "stream")
AUGMENTS = ("none", "hflip")
# name -> (torchvision class, folder under root that holds its files)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B, as PIL
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

Item = tuple[Tensor, Tensor]


class DataError(ValueError):
    """Bad or missing data; the one-line message says what is wrong and what to do."""


@dataclass(frozen=True, kw_only=True)
class DataConfig(Config):
    """Which images to load and how to split and shape them."""

    name: str = "digits"
    root: str = "data"
    path: str | None = None
    image_size: int | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    limit: int | None = None
    download: bool = True
    # H5 (two-level VQ-VAE): which code map a prior models, see vqprior.train.hierarchy
    level: str | None = None  # None (one-level VAE) | "top" | "bottom"
    augment: str = "none"  # "hflip": train on every image and its mirror image (Mirrored)

    def __post_init__(self) -> None:
        check_choice("name", self.name, DATASETS)
        check_choice("level", self.level, (None, "top", "bottom"))
        check_choice("augment", self.augment, AUGMENTS)
        if self.augment != "none" and self.name == "stream":
            raise ConfigError("augment does not apply to name='stream': shard the mirror images")
        if self.name in ("folder", "npz", "stream") and not self.path:
            what = "a shard directory" if self.name == "stream" else "a folder or .npz file"
            raise ConfigError(f"path must be set when name={self.name!r} ({what})")
        if self.image_size is not None:
            check_range("image_size", self.image_size, 1)
        if self.channels is not None:
            check_choice("channels", self.channels, (1, 3))
        check_range("val_fraction", self.val_fraction, 0.0, 1.0)
        check_range("test_fraction", self.test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} "
                "must be below 1 to leave training examples"
            )
        if self.limit is not None:
            check_range("limit", self.limit, 1)
            if self.name == "stream":
                raise ConfigError("limit does not apply to name='stream': shard fewer images")


class ImageSplits(NamedTuple):
    """Train/val/test datasets of ``(x [c, H, W] float, y long)`` items and their shape."""

    train: Dataset[Item]
    val: Dataset[Item]
    test: Dataset[Item]
    channels: int
    height: int
    width: int
    num_classes: int


def uint8_to_float(x: Tensor) -> Tensor:
    """uint8 in [0, 255] (any shape) -> float32 in [-1, 1]: v -> 2v/255 - 1."""
    if x.dtype != torch.uint8:
        raise ValueError(f"uint8_to_float expects a uint8 tensor, got {x.dtype}")
    return x.float() * (2.0 / (NUM_LEVELS - 1)) - 1.0


def float_to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] (any shape) -> uint8, rounding to the nearest of the 256 levels."""
    levels = (x.detach().float() + 1.0) * ((NUM_LEVELS - 1) / 2.0)
    return levels.round().clamp(0, NUM_LEVELS - 1).to(torch.uint8)


def _match_channels(img: Tensor, channels: int) -> Tensor:
    """uint8 [c, H, W] -> uint8 [channels, H, W] (grayscale <-> RGB)."""
    c = img.shape[0]
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return img.expand(3, -1, -1)
    if c == 3 and channels == 1:
        luma = torch.einsum("chw,c->hw", img.float(), img.new_tensor(_LUMA, dtype=torch.float32))
        return luma.round().clamp(0, NUM_LEVELS - 1).to(torch.uint8)[None]  # rounded, as PIL
    raise AssertionError(f"no conversion from {c} to {channels} channels")  # sources give 1 or 3


@dataclass(frozen=True)
class _Prepare:
    """uint8 [c, H, W] -> float [channels, s, s]: channel conversion, resize + center crop."""

    channels: int
    size: int | None

    def __call__(self, img: Tensor) -> Tensor:
        img = _match_channels(img, self.channels)
        if self.size is not None:
            img = TF.resize(img, [self.size], antialias=True)  # shorter side -> size
            img = TF.center_crop(img, [self.size, self.size])
        return uint8_to_float(img)


class ImageTensorDataset(Dataset[Item]):
    """Images held in memory: uint8 ``[N, c, H, W]``, labels long ``[N]`` (-1: unlabelled)."""

    def __init__(self, images: Tensor, labels: Tensor, channels: int, size: int | None) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(labels) == len(images)
        self.images, self.labels = images, labels.long()
        self.shape: tuple[int, int] = (images.shape[2], images.shape[3])  # native H, W
        self.prepare = _Prepare(channels, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Item:
        return self.prepare(self.images[i]), self.labels[i]


def _read_image(path: Path, mode: str) -> Tensor:
    """Decode one file fully -> uint8 [c, H, W]; a corrupt file raises DataError naming it."""
    try:
        with Image.open(path) as im:
            img = im.convert(mode)  # forces the full decode, so truncation shows here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({err}): fix or delete this file") from err
    return TF.pil_to_tensor(img)


class ImageFileDataset(Dataset[Item]):
    """Image files decoded per item; ``shape`` (H, W) is enforced when there is no resize."""

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        channels: int,
        size: int | None,
        shape: tuple[int, int],
    ) -> None:
        self.files, self.labels, self.shape = files, torch.tensor(labels, dtype=torch.long), shape
        self.prepare = _Prepare(channels, size)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        img = _read_image(self.files[i], self.mode)
        if self.prepare.size is None and tuple(img.shape[1:]) != self.shape:
            h, w = self.shape
            raise DataError(
                f"image {self.files[i]} is {img.shape[1]}x{img.shape[2]} but the first image is "
                f"{h}x{w}: set image_size to resize every image to one square size"
            )
        return self.prepare(img), self.labels[i]


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[Tensor]:
    """Disjoint sorted long index tensors [train, val, test] covering range(n), seeded."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n - n_val - n_test < 1:
        raise DataError(f"{n} examples leave none for training: lower val_fraction/test_fraction")
    parts = torch.split(perm, [n - n_val - n_test, n_val, n_test])
    return [p.sort().values for p in parts]


class Mirrored(Dataset[Item]):
    """A dataset and its mirror images: item ``i < N`` is ``ds[i]``, item ``N + i`` is
    ``ds[i]`` flipped left to right (same label). Augmentation as data: the training order
    (a function of the seed and the step), resuming and DDP sharding treat the mirror images
    as any others, and a prior on codes is trained on the codes of both."""

    def __init__(self, ds: Dataset[Item]) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return 2 * len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Item:
        n = len(self.ds)  # type: ignore[arg-type]
        if not -2 * n <= i < 2 * n:
            raise IndexError(f"index {i} out of range for {2 * n} items")
        x, y = self.ds[i % n]
        return (x.flip(-1) if i % (2 * n) >= n else x), y


def _limit(train: Tensor, limit: int | None, seed: int) -> Tensor:
    """A seeded random subset of at most ``limit`` train indices (sorted)."""
    if limit is None or limit >= len(train):
        return train
    gen = torch.Generator().manual_seed(seed + 1)
    return train[torch.randperm(len(train), generator=gen)[:limit]].sort().values


def _nhwc_to_tensor(x: np.ndarray | Tensor) -> Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> contiguous uint8 tensor [N, C, H, W]."""
    t = torch.as_tensor(x)
    if t.ndim == 3:
        return rearrange(t, "n h w -> n 1 h w").contiguous()
    return rearrange(t, "n h w c -> n c h w").contiguous()


def _load_digits() -> tuple[Tensor, Tensor, int]:
    """scikit-learn's 1,797 digits -> uint8 [N, 1, 8, 8], labels [N], 10 classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the digits set needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    x = np.rint(digits.images * (NUM_LEVELS - 1) / DIGITS_LEVELS).astype(np.uint8)
    return _nhwc_to_tensor(x), torch.as_tensor(digits.target, dtype=torch.long), 10


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    if not p.is_file():
        raise DataError(f"npz file {p} not found: set path to an .npz with x uint8 [N, H, W, C]")
    try:
        f = np.load(p, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise TypeError("it holds one .npy array, not an .npz archive")
        with f:
            return {k: f[k] for k in f.files if k in ("x", "y")}
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot read {p} as .npz ({err}): rewrite it with numpy.savez") from err


def _as_uint8(p: Path, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8: integers in 0..255 are converted; anything else is refused with one
    line naming the range vqprior expects and the conversion that gives it."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "iuf" or x.size == 0:
        raise DataError(f"{p}: x has dtype {x.dtype}, expected uint8 0..255: convert before saving")
    lo, hi = float(x.min()), float(x.max())
    if x.dtype.kind in "iu" and lo >= 0 and hi <= NUM_LEVELS - 1:
        return x.astype(np.uint8)
    if x.dtype.kind == "f" and lo >= -1.0 and hi <= 1.0:
        fix = "np.round(x * 255)" if lo >= 0 else "np.round((x + 1) * 127.5)"
    elif lo >= 0 and hi <= NUM_LEVELS - 1:
        fix = "np.round(x)"
    else:
        fix = "x rescaled to 0..255"
    raise DataError(
        f"{p}: x holds {x.dtype} values in [{lo:.4g}, {hi:.4g}], but vqprior reads 8-bit images "
        f"(uint8 0..255, which it maps to [-1, 1] as 2v/255 - 1): save x as {fix}.astype(np.uint8)"
    )


def _load_npz(path: str) -> tuple[Tensor, Tensor, int]:
    """``x`` uint8 [N, H, W(, C)] and optional integer ``y`` [N] -> uint8 [N, C, H, W], labels."""
    p = Path(path)
    arrays = _read_npz(p)
    if "x" not in arrays:
        raise DataError(f"{p} has no array 'x': save images as x=uint8 [N, H, W, C]")
    x = _as_uint8(p, arrays["x"])
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)) or len(x) == 0:
        raise DataError(f"{p}: x has shape {x.shape}, expected uint8 [N, H, W, C] with C 1 or 3")
    if "y" not in arrays:
        return _nhwc_to_tensor(x), torch.full((len(x),), -1, dtype=torch.long), 0
    y = arrays["y"]
    if y.dtype.kind not in "iu" or y.shape != (len(x),) or (y < 0).any():
        raise DataError(
            f"{p}: y must be non-negative integers of shape ({len(x)},), got {y.dtype} {y.shape}"
        )
    return _nhwc_to_tensor(x), torch.as_tensor(y.astype(np.int64)), int(y.max()) + 1


def _load_torchvision(cfg: DataConfig, train: bool) -> tuple[Tensor, Tensor]:
    """A torchvision set's train or test part -> uint8 [N, C, H, W], labels [N]."""
    cls_name, sub = _TORCHVISION[cfg.name]
    root = Path(cfg.root).resolve()
    try:
        ds = getattr(torchvision.datasets, cls_name)(
            root=str(root), train=train, download=cfg.download
        )
    except (RuntimeError, OSError) as err:  # URLError is an OSError
        how, fix = (
            ("download failed (offline?)", "")
            if cfg.download
            else ("download=false", "with download=true ")
        )
        raise DataError(
            f"{cls_name} not found under {root} and {how}: put the raw files in "
            f"{root / sub}/ or run once online {fix}".rstrip()
        ) from err
    return _nhwc_to_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.long)


def _scan_folder(root: Path) -> tuple[list[Path], list[int], int]:
    """Image files under ``root``: labelled by class subfolder, else loose files unlabelled."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found: set path to a directory of images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=True) if classes else []
    if samples:
        return [Path(f) for f, _ in samples], [t for _, t in samples], len(classes)
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS)
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {root} or its subfolders")
    return files, [-1] * len(files), 0


def _folder_dataset(cfg: DataConfig) -> tuple[ImageFileDataset, int]:
    """The whole folder as one dataset, and its number of classes."""
    assert cfg.path is not None
    files, labels, num_classes = _scan_folder(Path(cfg.path))
    try:
        with Image.open(files[0]) as im:  # header only: native mode and size
            native, (w, h) = (1 if im.mode in _GRAY_MODES else 3), im.size
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {files[0]} ({err}): fix or delete this file") from err
    ds = ImageFileDataset(files, labels, cfg.channels or native, cfg.image_size, (h, w))
    return ds, num_classes


def _memory_dataset(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset | None, int]:
    """digits, npz or a torchvision set -> (full set, official test set or None, classes)."""
    test_part = None
    if cfg.name in _TORCHVISION:
        (images, labels), num_classes = _load_torchvision(cfg, train=True), 10
        test_part = _load_torchvision(cfg, train=False)
    elif cfg.name == "digits":
        images, labels, num_classes = _load_digits()
    else:
        images, labels, num_classes = _load_npz(str(cfg.path))
    channels = cfg.channels or images.shape[1]
    full = ImageTensorDataset(images, labels, channels, cfg.image_size)
    test = None if test_part is None else ImageTensorDataset(*test_part, channels, cfg.image_size)
    return full, test, num_classes


def load_image_splits(cfg: DataConfig, codes: bool = False) -> ImageSplits:
    """Load ``cfg.name`` and split it; see :class:`DataConfig` for the sources and options.
    Code-map shards are refused unless ``codes`` (a prior on a VAE's codes reads them).

    Sets with an official test split keep it and carve val from train; the rest are split
    by a permutation seeded with ``split_seed``. ``limit`` caps the train split only.
    ``stream`` keeps the splits its shards were written with (:func:`vqprior.streaming.stream_splits`).
    """
    if cfg.name == "stream":
        from vqprior.streaming import stream_splits

        return stream_splits(cfg, codes)
    full: ImageTensorDataset | ImageFileDataset
    test: Dataset[Item] | None
    if cfg.name == "folder":
        (full, num_classes), test = _folder_dataset(cfg), None
    else:
        full, test, num_classes = _memory_dataset(cfg)
    test_fraction = 0.0 if test is not None else cfg.test_fraction
    idx = split_indices(len(full), cfg.val_fraction, test_fraction, cfg.split_seed)
    train_idx = _limit(idx[0], cfg.limit, cfg.split_seed)
    height, width = (cfg.image_size,) * 2 if cfg.image_size else full.shape
    channels = full.prepare.channels
    logger.info(
        "%s: %d train%s, %d val images [%d, %d, %d]",
        cfg.name,
        len(train_idx),
        " (and their mirror images)" if cfg.augment == "hflip" else "",
        len(idx[1]),
        channels,
        height,
        width,
    )
    train: Dataset[Item] = Subset(full, train_idx.tolist())
    return ImageSplits(
        train=Mirrored(train) if cfg.augment == "hflip" else train,
        val=Subset(full, idx[1].tolist()),
        test=test if test is not None else Subset(full, idx[2].tolist()),
        channels=channels,
        height=height,
        width=width,
        num_classes=num_classes,
    )
