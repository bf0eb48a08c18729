"""Stage between the two models: encode a dataset to code maps, keyed by the VAE's content hash."""

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
from vqprior.train.rundir import find_export, read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VAE_RECORD = "vae.json"  # in a codes prior's model/ dir and run dir
Codes = dict[str, tuple[torch.Tensor, torch.Tensor]]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (x [c, H, W], y) -> codes long [N, h, w] (on CPU), labels long [N]."""
    vae = vae.to(device).eval()
    codes, labels = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        codes.append(vae.encode(x.to(device)).cpu())
        labels.append(y.long())
    if not codes:  # an empty split
        return torch.zeros(0, 0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(codes), torch.cat(labels)


def _meta(record: dict[str, Any], data_cfg: DataConfig, split: str) -> dict[str, str]:
    h, w = record["grid"]
    return {
        "vae_hash": record["vae_hash"],
        "num_codes": str(record["num_codes"]),
        "grid": f"{h}x{w}",
        "split": split,
        "data": json.dumps(data_cfg.to_dict(), sort_keys=True),
    }


def encode_splits(
    vae: VQVAE,
    record: dict[str, Any],
    splits: ImageSplits,
    data_cfg: DataConfig,
    out: Path,
    batch_size: int = 256,
    device: str | None = None,
) -> Codes:
    """Encode train/val/test and write ``out/<split>.safetensors`` with the VAE's hash in meta."""
    result: Codes = {}
    for split in SPLITS:
        codes, labels = encode_dataset(
            vae, getattr(splits, split), batch_size, default_device(device)
        )
        if len(codes) == 0:
            codes = torch.zeros(0, *record["grid"], dtype=torch.long)
        save_codes(out / f"{split}.safetensors", codes, labels, _meta(record, data_cfg, split))
        result[split] = (codes, labels)
    logger.info("encoded %s into %s", {k: len(v[0]) for k, v in result.items()}, out)
    return result


def encode_codes(
    vae_dir: str | Path,
    data_cfg: DataConfig | dict[str, Any],
    out: str | Path,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, Path]:
    """Encode a dataset's train/val/test images with a trained VAE into ``out/<split>.safetensors``.

    Each file's meta holds ``vae_hash`` (content hash of the VAE export), ``num_codes``,
    ``grid`` ("hxw"), the split and the data config.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_dict(data_cfg)
    vae, export = load_vae(vae_dir)
    splits = load_image_splits(cfg)
    check_vae_channels(vae, splits)
    record = vae_record(vae, export, (splits.channels, splits.height, splits.width))
    if vae.config.levels == 2:  # two-level VAE: both code maps (vqprior.train.hierarchy)
        from vqprior.train.hierarchy import encode_codes_levels

        return encode_codes_levels(vae, record, splits, cfg, Path(out), batch_size, device)
    with RunLock(out):
        encode_splits(vae, record, splits, cfg, Path(out), batch_size, device)
    return {s: Path(out) / f"{s}.safetensors" for s in SPLITS}


def check_vae_channels(vae: VQVAE, splits: ImageSplits) -> None:
    if vae.config.in_channels != splits.channels:
        raise ValueError(
            f"the VAE takes {vae.config.in_channels}-channel images but the data has {splits.channels}: "
            "set data.channels or use the VAE trained on this data"
        )
    vae.latent_shape(splits.height, splits.width)


def stored_codes(
    codes_dir: Path, record: dict[str, Any], data_cfg: DataConfig, strict: bool
) -> Codes | None:
    """Codes stored under ``codes_dir`` if they came from this VAE and data, else None.

    ``strict``: a mismatch (or missing files) raises instead of returning None.
    """
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


def read_vae_record(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / VAE_RECORD
    return read_json(path) if path.is_file() else None
