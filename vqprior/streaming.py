"""Data larger than memory, on many nodes: litdata's streaming shards of images or code maps.

``vqprior shard IMAGES -o DIR`` (:func:`write_image_shards`) and ``vqprior encode --format
shards`` (:func:`encode_shards`) write batch by batch (nothing holds the whole set)::

    DIR/vqprior.json          what the shards hold: kind (images | codes), shapes, classes, counts
    DIR/<split>/index.json    litdata's index and its chunk-*.bin files (train, val, test)

A config reads them with ``data.name: stream`` and ``data.path: DIR`` (or a litdata folder
alone, used as the train split). Training streams the train split through litdata's
``StreamingDataLoader``: its shuffle (a seeded chunk order and in-chunk windows, new each
epoch) and its per-rank split under DDP (each rank a disjoint part; the tail that cannot fill
one batch on every rank is left out of that epoch). Val, test and ``encode`` read by index.

Items on disk: images ``{"image": uint8 [c, H, W], "label": int, "index": int}``; code maps
``{"codes": int16 [h, w], "label", "index"}`` (two levels: ``"top"`` and ``"bottom"``;
int32 above 32,768 codes). ``index`` is the item's place in that split of the in-memory path
(:func:`vqprior.data.load_image_splits` on the source), so both read the same items.

litdata is an optional extra (``pip install "vqprior[stream]"``), imported here only when
shards are read or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from vqprior.config import ConfigError
from vqprior.data import (
    DataConfig,
    DataError,
    ImageSplits,
    _Prepare,
    float_to_uint8,
    load_image_splits,
)

logger = logging.getLogger(__name__)

META = "vqprior.json"
INDEX = "index.json"  # litdata's
SPLITS = ("train", "val", "test")
FORMAT = "vqprior-shards/1"
CHUNK_BYTES = "64MB"  # litdata's advice for chunks streamed from disk or object storage
Batch = tuple[dict[str, Tensor], Tensor, Tensor]  # fields [b, ...], labels [b], indices [b]


def litdata() -> Any:
    """The litdata module, or a DataError that says how to install it."""
    try:
        import litdata as ld
    except ImportError as err:
        raise DataError(
            'streaming shards need litdata: pip install "vqprior[stream]" (or pip install litdata)'
        ) from err
    return ld


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ImageItem:
    """Image shard item -> ``(x float [c, H, W] in [-1, 1], y long)`` (picklable for workers)."""

    prepare: _Prepare

    def __call__(self, item: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return self.prepare(item["image"]), torch.tensor(item["label"], dtype=torch.long)


@dataclass(frozen=True)
class CodesItem:
    """Code shard item -> ``(codes long [h, w], y long, *condition codes long)``: ``keys`` names
    the level modelled, then the level it is conditioned on (a bottom prior: ``top``)."""

    keys: tuple[str, ...]

    def __call__(self, item: dict[str, Any]) -> tuple[Tensor, ...]:
        first, *rest = (item[k].long() for k in self.keys)
        return (first, torch.tensor(item["label"], dtype=torch.long), *rest)


class ShardDataset(Dataset[Any]):
    """One split of a shard directory. Map-style (items by index: val, test, ``encode``);
    :meth:`streaming` opens it for training. ``path`` None: an empty split."""

    def __init__(self, path: Path | None, transform: Any, meta: dict[str, Any]) -> None:
        self.path, self.transform, self.meta = path, transform, meta
        self.length = 0 if path is None else _count(path)
        self._reader: Any = None  # opened on first access, in each process

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        if self._reader is None:
            self._reader = self.streaming()
        return self._reader[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # workers open their own

    def streaming(self, shuffle: bool = False, seed: int = 0) -> Any:
        """A litdata ``StreamingDataset`` of this split; build it where it iterates (it reads
        the DDP rank and world size when built)."""
        assert self.path is not None
        return litdata().StreamingDataset(
            str(self.path),
            shuffle=shuffle,
            seed=seed % 2**31,
            transform=self.transform,
            batch_decode=0,  # per item: "auto" decoded each 32-item window ~30 times (4x slower)
        )


def _count(split_dir: Path) -> int:
    try:
        index = json.loads((split_dir / INDEX).read_text())
        return sum(int(c["chunk_size"]) for c in index["chunks"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read {split_dir / INDEX} ({err}): write the shards again") from err


def split_dirs(root: Path) -> dict[str, Path | None]:
    """Each split's litdata folder under ``root`` (None: none); ``root`` itself is the train
    split when it holds an ``index.json``."""
    if not root.is_dir():
        raise DataError(f"shard directory {root} not found: write it with `vqprior shard`")
    if (root / INDEX).is_file():
        return {"train": root, "val": None, "test": None}
    found = {s: root / s if (root / s / INDEX).is_file() else None for s in SPLITS}
    if found["train"] is None:
        raise DataError(
            f"{root} holds no litdata shards ({INDEX}, or train/{INDEX}): "
            "write them with `vqprior shard IMAGES -o DIR`"
        )
    return found


def read_meta(root: Path, train: Path) -> dict[str, Any]:
    """``root/vqprior.json``; for image shards written by other tools (items with ``image``
    uint8 [c, H, W] and ``label``), the shape of the first train item, unlabelled."""
    if (root / META).is_file():
        return json.loads((root / META).read_text())
    item = litdata().StreamingDataset(str(train))[0]
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        raise DataError(
            f"{train}: items must be dicts with 'image' (uint8 [c, H, W]) and 'label' "
            f"(code maps need {META}: write them with `vqprior encode --format shards`)"
        )
    return {"kind": "images", "shape": list(item["image"].shape), "num_classes": 0}


def _level_keys(meta: dict[str, Any], level: str | None, root: Path) -> tuple[str, ...]:
    """The code keys a prior on ``level`` reads: its level, then the one above (if any)."""
    levels = list(meta["levels"])
    if level is None and len(levels) == 1:
        return (levels[0],)
    if len(levels) == 1:
        raise ConfigError(f"{root} holds the codes of a one-level VAE: drop data.level={level}")
    if level is None or level not in levels:
        want = " or ".join(f"data.level={n}" for n in levels)
        raise ConfigError(f"{root} holds the code maps {', '.join(levels)}: set {want}")
    i = levels.index(level)
    return (level, levels[i - 1]) if i else (level,)


def stream_splits(cfg: DataConfig, codes: bool = False) -> ImageSplits:
    """``data.name: stream``: the shard directory ``cfg.path`` as train/val/test datasets.

    Images: ``(x, y)`` items through ``image_size`` and ``channels`` as the other sources.
    Code maps: ``(codes, y)`` items (``(bottom, y, top)`` for ``data.level=bottom``) with the
    image shape the VAE encoded. The splits are those fixed when the shards were written.
    """
    assert cfg.path is not None
    root = Path(cfg.path)
    dirs = split_dirs(root)
    assert dirs["train"] is not None
    meta = read_meta(root, dirs["train"])
    if meta["kind"] == "codes" and not codes:
        raise ConfigError(
            f"{root} holds code maps (vqprior encode --format shards), not images: "
            "train a prior on them with vae set to the VAE that encoded them"
        )
    transform: ImageItem | CodesItem
    if meta["kind"] == "images":
        c, h, w = meta["shape"]
        channels = cfg.channels or c
        transform = ImageItem(_Prepare(channels, cfg.image_size))
        shape = (channels, *((cfg.image_size,) * 2 if cfg.image_size else (h, w)))
    else:
        transform = CodesItem(_level_keys(meta, cfg.level, root))
        shape = tuple(meta["image_shape"])
    sets = {s: ShardDataset(dirs[s], transform, meta) for s in SPLITS}
    logger.info("%s: %s %s shards", root, {s: len(d) for s, d in sets.items()}, meta["kind"])
    return ImageSplits(
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        channels=shape[0],
        height=shape[1],
        width=shape[2],
        num_classes=int(meta.get("num_classes", 0)),
    )


def is_code_shards(splits: ImageSplits) -> bool:
    """Whether ``splits`` came from code-map shards (``data.name: stream``)."""
    return isinstance(splits.train, ShardDataset) and splits.train.meta["kind"] == "codes"


def is_code_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` holds code-map shards (``vqprior encode --format shards``)."""
    meta = Path(path) / META
    return meta.is_file() and json.loads(meta.read_text()).get("kind") == "codes"


def check_code_shards(splits: ImageSplits, record: dict[str, Any]) -> None:
    """Code shards must come from the VAE of ``record`` (content hash, codebook, grid)."""
    assert isinstance(splits.train, ShardDataset)
    meta, key = splits.train.meta, splits.train.transform.keys[0]
    found = {"vae_hash": meta.get("vae_hash"), "num_codes": meta.get("num_codes")}
    found["grid"] = meta.get("grids", {}).get(key)
    for name, value in found.items():
        if value != record[name]:
            raise ValueError(
                f"the code shards {splits.train.path} were encoded with a different "
                f"{'VAE' if name == 'vae_hash' else name} ({value!r}, expected {record[name]!r}): "
                "encode again with `vqprior encode --format shards` and this VAE"
            )


def stream_loader(ds: ShardDataset, batch_size: int, num_workers: int, seed: int) -> Any:
    """Training batches of ``ds``: litdata's ``StreamingDataLoader``, shuffled with ``seed``
    (a new order each epoch), this DDP rank's part, full batches only."""
    ld = litdata()
    stream = ds.streaming(shuffle=True, seed=seed)
    world = stream.distributed_env.world_size
    if len(ds) < batch_size * world:
        raise DataError(
            f"{len(ds)} training items cannot fill a batch of {batch_size} on each of {world} "
            "processes: lower train.batch_size or use more data"
        )
    return ld.StreamingDataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )


# ----------------------------------------------------------------------------- writing


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` renamed to ``out`` once complete (a killed run leaves no
    half-written ``out``); ``out`` must not exist or be empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists: choose a new output directory or delete it")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_split(split_dir: Path, batches: Iterable[Batch], chunk_bytes: int | str) -> int:
    """Write every item of ``batches`` into litdata chunks under ``split_dir``; the count."""
    litdata()
    from litdata.streaming.writer import BinaryWriter

    split_dir.mkdir(parents=True)
    writer, n = BinaryWriter(str(split_dir), chunk_bytes=chunk_bytes), 0
    for fields, labels, indices in batches:
        for b in range(len(labels)):
            item = {k: v[b].clone() for k, v in fields.items()}
            writer.add_item(n, {**item, "label": int(labels[b]), "index": int(indices[b])})
            n += 1
    if n == 0:
        split_dir.rmdir()  # an empty split: no folder
        return 0
    writer.done()
    # this writer's index alone: merge() would wait for the index of every DDP rank
    writer._merge_no_wait()
    return n


def _write_meta(root: Path, meta: dict[str, Any]) -> None:
    (root / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def _source_config(source: str | Path, **options: Any) -> DataConfig:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"images {path} not found: give a folder of images or an .npz")
    return DataConfig(name="folder" if path.is_dir() else "npz", path=str(path), **options)


def _image_batches(
    ds: Dataset[Any], order: Tensor, batch_size: int, num_workers: int
) -> Iterator[Batch]:
    loader = DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, num_workers=num_workers)
    start = 0
    for x, y in loader:
        yield {"image": float_to_uint8(x)}, y, order[start : start + len(y)]
        start += len(y)


def write_image_shards(
    source: str | Path | DataConfig,
    out: str | Path,
    *,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    chunk_bytes: int | str = CHUNK_BYTES,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Shard a folder of images or an ``.npz`` (or any data config) into ``out``.

    The splits are those of the in-memory path (``load_image_splits``: the same fractions and
    seed, DataConfig's defaults where an option is None; a source's own test split is kept);
    images go through ``image_size`` and ``channels`` there, so every item has one shape. The
    train split is written in a seeded order (chunks mix the classes of a sorted folder).
    Returns the counts and ``out``.
    """
    opts: dict[str, Any] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "image_size": image_size,
        "channels": channels,
    }
    given = {k: v for k, v in opts.items() if v is not None}
    if isinstance(source, DataConfig):
        cfg = dataclasses.replace(source, **given)
    else:
        cfg = _source_config(source, **given)
    splits = load_image_splits(cfg)
    if is_code_shards(splits):
        raise DataError(f"{cfg.path} holds code maps, not images")
    counts: dict[str, int] = {}
    with _staging(Path(out)) as tmp:
        for split in SPLITS:
            ds = getattr(splits, split)
            order = torch.arange(len(ds))
            if split == "train":  # seeded: chunks mix the classes of a sorted folder
                gen = torch.Generator().manual_seed(cfg.split_seed)
                order = torch.randperm(len(ds), generator=gen)
            batches = _image_batches(ds, order, batch_size, num_workers)
            counts[split] = _write_split(tmp / split, batches, chunk_bytes)
        shape = [splits.channels, splits.height, splits.width]
        meta = {"kind": "images", "shape": shape, "num_classes": splits.num_classes}
        _write_meta(tmp, {**meta, "counts": counts, "source": cfg.to_dict()})
    logger.info("wrote %s image shards to %s", counts, out)
    return {"out": str(out), **counts}


@torch.no_grad()
def _code_batches(
    vae: Any, ds: Dataset[Any], dtype: torch.dtype, batch_size: int, device: torch.device
) -> Iterator[Batch]:
    """Each level's codes of ``ds``'s images, in order, one batch at a time."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    start = 0
    for x, y in loader:
        levels = vae.encode_levels(x.to(device))
        fields = {n: c.cpu().to(dtype) for n, c in zip(vae.level_names, levels, strict=True)}
        yield fields, y, torch.arange(start, start + len(y))
        start += len(y)


def encode_shards(
    vae_dir: str | Path,
    data_cfg: DataConfig | dict[str, Any],
    out: str | Path,
    batch_size: int = 256,
    device: str | None = None,
    chunk_bytes: int | str = CHUNK_BYTES,
) -> dict[str, Any]:
    """Encode a dataset's train/val/test images with a trained VAE into code-map shards.

    The same codes, labels and order as :func:`vqprior.train.codes.encode_codes`, streamed
    batch by batch into litdata chunks; ``vqprior.json`` records the VAE (content hash),
    the levels, their grids, the image shape and the data config. Returns counts and ``out``.
    """
    from vqprior.train.codes import check_vae_channels, default_device, load_vae, vae_record

    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_dict(data_cfg)
    vae, export = load_vae(vae_dir)
    splits = load_image_splits(cfg)
    if is_code_shards(splits):
        raise DataError(f"{cfg.path} holds code maps already: encode images")
    check_vae_channels(vae, splits)
    image_shape = (splits.channels, splits.height, splits.width)
    record = vae_record(vae, export, image_shape)
    dev = default_device(device)
    vae = vae.to(dev).eval()
    dtype = torch.int16 if vae.config.num_codes <= 2**15 else torch.int32
    grids = vae.level_shapes(splits.height, splits.width)
    counts: dict[str, int] = {}
    with _staging(Path(out)) as tmp:
        for split in SPLITS:
            batches = _code_batches(vae, getattr(splits, split), dtype, batch_size, dev)
            counts[split] = _write_split(tmp / split, batches, chunk_bytes)
        meta = {
            "kind": "codes",
            "levels": list(vae.level_names),
            "grids": {n: list(g) for n, g in zip(vae.level_names, grids, strict=True)},
            **{k: record[k] for k in ("vae_hash", "vae_path", "num_codes", "image_shape")},
            "num_classes": splits.num_classes,
            "counts": counts,
            "data": dataclasses.replace(cfg, level=None).to_dict(),
        }
        _write_meta(tmp, meta)
    logger.info("encoded %s into code shards %s", counts, out)
    return {"out": str(out), **counts}
