"""What stages write: code maps (safetensors with metadata) and image grids (PNG), atomically."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset

from vqprior.data import DataError, Item, float_to_uint8
from vqprior.io import atomic_write_bytes


def _check_codes(codes: Tensor, labels: Tensor, where: str) -> None:
    if codes.ndim != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise DataError(
            f"{where}: codes must be integers [N, h, w], got {codes.dtype} {tuple(codes.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(codes) or labels.dtype.is_floating_point:
        raise DataError(
            f"{where}: labels must be integers [{len(codes)}], got {labels.dtype} {tuple(labels.shape)}"
        )


def save_codes(
    path: str | os.PathLike[str], codes: Tensor, labels: Tensor, meta: dict[str, str] | None = None
) -> None:
    """Write code maps long [N, h, w], labels long [N] and string ``meta`` as safetensors, atomically.

    Codes are stored as int32 when they fit (they always do for a codebook), else int64.
    """
    _check_codes(codes, labels, "save_codes")
    meta = dict(meta or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("save_codes: meta must map str to str (format numbers with str())")
    i32 = torch.iinfo(torch.int32)
    fits = codes.numel() == 0 or (int(codes.min()) >= i32.min and int(codes.max()) <= i32.max)
    tensors = {
        "codes": codes.detach().cpu().to(torch.int32 if fits else torch.int64).contiguous(),
        "labels": labels.detach().cpu().long().contiguous(),
    }
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))


def load_codes(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, dict[str, str]]:
    """Read ``save_codes`` output -> (codes long [N, h, w], labels long [N], meta)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"code file {p} not found: encode the dataset with the VAE first or fix the path"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DataError(f"cannot read code file {p} ({err}): delete it and encode again") from err
    if "codes" not in tensors or "labels" not in tensors:
        raise DataError(f"{p} lacks 'codes' or 'labels': delete it and encode again")
    codes = tensors["codes"]
    _check_codes(codes, tensors["labels"], str(p))
    k = meta.get("num_codes", "")
    # checked once here, so that the training step can skip the prior's per-step value checks
    if k.isdigit() and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= int(k)):
        raise DataError(f"{p}: codes outside [0, {k}): delete it and encode again")
    return codes.long(), tensors["labels"].long(), meta


class CodesDataset(Dataset[Item]):
    """Code maps long ``[N, h, w]`` with labels long ``[N]``; items ``(codes [h, w], y)``."""

    def __init__(
        self, codes: Tensor, labels: Tensor | None = None, meta: dict[str, str] | None = None
    ) -> None:
        labels = torch.full((len(codes),), -1, dtype=torch.long) if labels is None else labels
        _check_codes(codes, labels, "CodesDataset")
        self.codes, self.labels, self.meta = codes.long(), labels.long(), dict(meta or {})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CodesDataset:
        return cls(*load_codes(path))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> Item:
        return self.codes[i], self.labels[i]


def image_grid(x: Tensor, nrow: int = 8, padding: int = 2) -> Tensor:
    """Images float [b, c, H, W] in [-1, 1] -> one uint8 grid [H', W', c], ``nrow`` per row.

    Like torchvision's make_grid (black ``padding`` around every image) but keeps ``c``:
    H' = rows * (H + padding) + padding, W' = min(nrow, b) * (W + padding) + padding.
    """
    if x.ndim != 4 or len(x) == 0 or nrow < 1:
        raise ValueError(
            f"image_grid expects [b, c, H, W] with b >= 1 and nrow >= 1, got {tuple(x.shape)}"
        )
    b, c, h, w = x.shape
    ncol = min(nrow, b)
    rows = math.ceil(b / ncol)
    q = float_to_uint8(x.cpu())
    q = torch.cat([q, q.new_zeros(rows * ncol - b, c, h, w)])  # blank slots fill the last row
    q = F.pad(q, (padding, 0, padding, 0))  # left and top of every image
    grid = rearrange(q, "(r n) c h w -> (r h) (n w) c", n=ncol)
    return F.pad(grid, (0, 0, 0, padding, 0, padding))  # right and bottom edge of the grid


def upscale(x: Tensor, min_size: int) -> Tensor:
    """Images [b, c, H, W] -> [b, c, s H, s W], each pixel an s x s block (nearest neighbour),
    with the smallest integer s that makes min(H, W) >= ``min_size`` (s = 1 when it already is).
    """
    s = max(1, math.ceil(min_size / min(x.shape[-2:])))
    return x if s == 1 else repeat(x, "b c h w -> b c (h s1) (w s2)", s1=s, s2=s)


def save_image_grid(
    path: str | os.PathLike[str], x: Tensor, nrow: int = 8, min_size: int = 32
) -> None:
    """Write :func:`image_grid` of ``x`` (c of 1 or 3) to ``path`` as a PNG, atomically; small
    images are first enlarged to at least ``min_size`` pixels (:func:`upscale`) to be seen."""
    grid = image_grid(upscale(x, min_size), nrow)
    if grid.shape[-1] not in (1, 3):
        raise ValueError(f"save_image_grid writes 1 or 3 channels, got {grid.shape[-1]}")
    buf = io.BytesIO()
    Image.fromarray(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy()).save(
        buf, "PNG"
    )
    atomic_write_bytes(path, buf.getvalue())
