"""Stage between the two models: encode a dataset to code maps, keyed by the VAE's content hash.

One path for every level count: :func:`encode_splits` writes each level's files
(:func:`level_dir`), :func:`stored_codes` finds them again and :func:`level_codes` reuses or
encodes them for train-prior; which level a prior models is in :mod:`vqprior.train.hierarchy`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vqprior.artifacts import load_codes, save_codes
from vqprior.data import DataConfig, ImageSplits, load_image_splits
from vqprior.io import CheckpointError, content_hash
from vqprior.lock import RunLock
from vqprior.models.vqvae import VQVAE
from vqprior.train.hierarchy import level_records, plain_data
from vqprior.train.rundir import find_export, read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VAE_RECORD = "vae.json"  # in a codes prior's model/ dir and run dir
Codes = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (codes [N, h, w], labels [N])
LevelCodes = tuple[Codes, ...]  # one per level, top first


def default_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_vae(vae_dir: str | Path) -> tuple[VQVAE, Path]:
    """The exported VQVAE of a train-vae run dir (or an export dir), in eval mode."""
    path = find_export(vae_dir, "VAE")
    return VQVAE.from_pretrained(path), path


def vae_record(vae: VQVAE, export: Path, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """What a codes prior records about its VAE: content hash, path, codebook size, grid."""
    _, height, width = image_shape
    return {
        "vae_hash": content_hash(export),
        "vae_path": str(export.resolve()),
        "num_codes": vae.config.num_codes,
        "grid": list(vae.latent_shape(height, width)),
        "image_shape": list(image_shape),
    }


@torch.no_grad()
def encode_dataset(
    vae: VQVAE, ds: Dataset[Any], batch_size: int, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Images (x [c, H, W], y) -> every level's codes long [N, h, w] (top first, on CPU) and
    labels long [N]."""
    vae = vae.to(device).eval()
    levels: list[list[torch.Tensor]] = [[] for _ in vae.level_names]
    labels = []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        for found, codes in zip(levels, vae.encode_levels(x.to(device)), strict=True):
            found.append(codes.cpu())
        labels.append(y.long())
    if not labels:  # an empty split
        empty = torch.zeros(0, 0, 0, dtype=torch.long)
        return tuple(empty for _ in levels), torch.zeros(0, dtype=torch.long)
    return tuple(torch.cat(codes) for codes in levels), torch.cat(labels)


def level_dir(root: Path, vae: VQVAE, i: int) -> Path:
    """Where level ``i``'s code files live: ``root`` for the finest (last) level, where a
    one-level VAE's go; ``root/<level name>`` for a coarser one (``root/top``)."""
    names = vae.level_names
    return root if i == len(names) - 1 else root / names[i]


def _meta(record: dict[str, Any], data_cfg: DataConfig, split: str) -> dict[str, str]:
    h, w = record["grid"]
    level = {"level": record["level"]} if "level" in record else {}  # a VAE of several levels
    return {
        "vae_hash": record["vae_hash"],
        "num_codes": str(record["num_codes"]),
        "grid": f"{h}x{w}",
        "split": split,
        "data": json.dumps(data_cfg.to_dict(), sort_keys=True),
        **level,
    }


def encode_splits(
    vae: VQVAE,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    batch_size: int = 256,
    device: str | None = None,
) -> LevelCodes:
    """Encode train/val/test and write every level's ``<split>.safetensors`` (in
    :func:`level_dir`) with the VAE's hash (and the level) in meta. Returns them top first."""
    data, records = plain_data(data_cfg), level_records(record, vae)
    result: LevelCodes = tuple({} for _ in records)
    for split in SPLITS:
        ds = getattr(splits, split)
        levels, labels = encode_dataset(vae, ds, batch_size, default_device(device))
        for i, (rec, codes) in enumerate(zip(records, levels, strict=True)):
            if len(codes) == 0:
                codes = torch.zeros(0, *rec["grid"], dtype=torch.long)
            path = level_dir(out, vae, i) / f"{split}.safetensors"
            save_codes(path, codes, labels, _meta(rec, data, split))
            result[i][split] = (codes, labels)
    logger.info("encoded %s into %s", {k: len(v[0]) for k, v in result[0].items()}, out)
    return result


def encode_codes(
    vae_dir: str | Path,
    data_cfg: DataConfig | dict[str, Any],
    out: str | Path,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, Path]:
    """Encode a dataset's train/val/test images with a trained VAE into every level's
    ``<split>.safetensors`` (see :func:`level_dir`): ``out/<split>.safetensors`` for a one-level
    VAE; the bottom there and the top in ``out/top/`` for two levels.

    Each file's meta holds ``vae_hash`` (content hash of the VAE export), ``num_codes``,
    ``grid`` ("hxw"), the split, the data config and (two levels) the ``level``. Returns the
    files by their path under ``out`` without suffix (``train``, ``top/train``, ...).
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_dict(data_cfg)
    vae, export = load_vae(vae_dir)
    splits = load_image_splits(cfg)
    check_vae_channels(vae, splits)
    record = vae_record(vae, export, (splits.channels, splits.height, splits.width))
    root = Path(out)
    with RunLock(root):
        encode_splits(vae, record, splits, cfg, root, batch_size, device)
    levels = range(len(vae.level_names))
    files = [level_dir(root, vae, i) / f"{s}.safetensors" for i in levels for s in SPLITS]
    return {str(f.relative_to(root).with_suffix("")): f for f in files}


def check_vae_channels(vae: VQVAE, splits: ImageSplits) -> None:
    if vae.config.in_channels != splits.channels:
        raise ValueError(
            f"the VAE takes {vae.config.in_channels}-channel images but the data has {splits.channels}: "
            "set data.channels or use the VAE trained on this data"
        )
    vae.latent_shape(splits.height, splits.width)


def _stored_level(
    codes_dir: Path, record: dict[str, Any], data_cfg: DataConfig, strict: bool
) -> Codes | None:
    """One level's codes under ``codes_dir`` if they came from this VAE and data, else None
    (``strict``: a mismatch or missing files raise)."""
    result: Codes = {}
    for split in SPLITS:
        path = codes_dir / f"{split}.safetensors"
        if not path.is_file():
            if strict:
                raise FileNotFoundError(f"{path} not found: run `vqprior encode` first")
            return None
        codes, labels, meta = load_codes(path)
        want = _meta(record, data_cfg, split)
        for key in ("vae_hash", "num_codes", "grid", "data"):
            if meta.get(key) != want[key]:
                if strict:
                    raise CheckpointError(
                        f"{path} was encoded with a different {'VAE' if key == 'vae_hash' else key} "
                        f"({meta.get(key)!r}, expected {want[key]!r}): encode again with this VAE and data"
                    )
                logger.info(
                    "stored codes in %s are stale (%s differs): re-encoding", codes_dir, key
                )
                return None
        result[split] = (codes, labels)
    return result


def stored_codes(
    vae: VQVAE, record: dict[str, Any], data_cfg: DataConfig, root: Path, strict: bool
) -> LevelCodes | None:
    """Every level's codes stored under ``root`` (top first) if this VAE made them from this
    data (``data.level`` aside: the levels share them), else None. ``strict``: a mismatch
    (or missing files) raises instead of returning None."""
    data, found = plain_data(data_cfg), []
    for i, rec in enumerate(level_records(record, vae)):
        codes = _stored_level(level_dir(root, vae, i), rec, data, strict)
        if codes is None:
            return None
        found.append(codes)
    return tuple(found)


def level_codes(
    vae: VQVAE,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    codes_dir: Path | None,
    device: str | None,
) -> LevelCodes:
    """Every level's codes (top first): from ``codes_dir`` (refused unless this VAE and data
    made them), else from ``<out>/codes`` when still valid, else encoded now into it (in
    batches of :func:`encode_splits`'s default, whatever batch the prior trains with)."""
    if codes_dir is not None:
        found = stored_codes(vae, record, data_cfg, codes_dir, strict=True)
        assert found is not None
        return found
    found = stored_codes(vae, record, data_cfg, out / "codes", strict=False)
    if found is not None:
        return found
    return encode_splits(vae, record, splits, data_cfg, out / "codes", device=device)


def read_vae_record(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / VAE_RECORD
    return read_json(path) if path.is_file() else None
