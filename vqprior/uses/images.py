"""Images for the "use" commands: a folder of image files or an ``.npz``, as uint8 tensors.

:func:`read_images` returns the images at their native size and channels (uint8
``[c, H, W]`` each, with a name); :func:`fit_images` converts them to a model's channels and
size (lossy: for scoring and completion), :func:`exact_images` refuses any change (lossless
compression).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


class ImageSet(NamedTuple):
    """Images at their native shape: uint8 ``[c, H, W]`` each, a display name each, optional
    integer labels (an ``.npz``'s ``y``), and whether names are file names (else indices)."""

    images: list[Tensor]
    names: list[str]
    labels: Tensor | None
    from_files: bool


def _mode(im: Image.Image) -> str:
    """The PIL mode to decode to: "L" for gray (alpha of "LA" dropped), "RGBA" when there is
    transparency, else "RGB"."""
    if im.mode in ("1", "L", "I", "I;16", "F", "LA"):
        return "L"
    if im.mode == "P":
        r, g, b = im.convert("RGB").split()
        if r.tobytes() == g.tobytes() == b.tobytes() and "transparency" not in im.info:
            return "L"
    return "RGBA" if im.mode in ("RGBA", "PA") or "transparency" in im.info else "RGB"


def _read_file(path: Path) -> Tensor:
    try:
        with Image.open(path) as im:
            img = im.convert(_mode(im))  # forces the full decode, so truncation shows here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path} ({err}): fix or remove this file") from None
    return TF.pil_to_tensor(img)


def _read_folder(root: Path) -> ImageSet:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return ImageSet([_read_file(f) for f in files], [f.name for f in files], None, True)


def _read_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise ValueError(f"{path} has no array 'x': save images as x=uint8 [N, H, W, C]")
            x, y = f["x"], (f["y"] if "y" in f.files else None)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, AttributeError) as err:
        raise ValueError(f"cannot read {path} as .npz ({err})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) == 0:
        raise ValueError(
            f"{path}: x is {x.dtype} {x.shape}, expected uint8 [N, H, W, C] (or [N, H, W])"
        )
    t = torch.as_tensor(x)
    t = rearrange(t, "n h w -> n 1 h w") if t.ndim == 3 else rearrange(t, "n h w c -> n c h w")
    labels = None
    if y is not None and y.shape == (len(x),) and y.dtype.kind in "iu":
        labels = torch.as_tensor(y.astype(np.int64))
    names = [f"{i:05d}" for i in range(len(x))]
    return ImageSet(list(t.contiguous()), names, labels, False)


def read_images(path: str | Path) -> ImageSet:
    """A directory of image files (sorted by name) or an ``.npz`` with ``x`` uint8
    ``[N, H, W, C]`` (and optional labels ``y``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"images {p} not found: pass a folder of images or an .npz")
    if p.is_dir():
        return _read_folder(p)
    if p.suffix.lower() == ".npz":
        return _read_npz(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSet([_read_file(p)], [p.name], None, True)
    raise ValueError(f"{p} is neither a folder of images nor an .npz file")


def convert_channels(img: Tensor, channels: int, name: str) -> Tensor:
    """uint8 [c, H, W] -> [channels, H, W]: gray <-> RGB (luma), RGBA drops alpha."""
    c = img.shape[0]
    if c == 4:
        img, c = img[:3], 3
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return img.expand(3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        luma = torch.einsum("chw,c->hw", img.float(), torch.tensor(_LUMA))
        return luma.round().clamp(0, 255).to(torch.uint8)[None]
    raise ValueError(
        f"image {name} has {img.shape[0]} channels and cannot be converted to the model's "
        f"{channels}: give 1 (gray), 3 (RGB) or 4 (RGBA) channel images"
    )


def fit_images(images: ImageSet, channels: int, height: int, width: int) -> Tensor:
    """Convert every image to ``channels`` and resize it (antialiased) to ``height x width``
    -> uint8 ``[N, channels, height, width]``."""
    out = []
    for img, name in zip(images.images, images.names, strict=True):
        img = convert_channels(img, channels, name)
        if tuple(img.shape[1:]) != (height, width):
            img = TF.resize(img, [height, width], antialias=True)
        out.append(img)
    return torch.stack(out)


def exact_images(images: ImageSet, channels: int, height: int, width: int) -> Tensor:
    """The images as uint8 ``[N, channels, height, width]``, refusing any lossy change."""
    for img, name in zip(images.images, images.names, strict=True):
        if tuple(img.shape) != (channels, height, width):
            c, h, w = img.shape
            raise ValueError(
                f"image {name} is {c}x{h}x{w} (channels x height x width) but the model codes "
                f"{channels}x{height}x{width}: lossless compression needs exactly that shape"
            )
    return torch.stack(images.images)


def png_bytes(img: Tensor) -> bytes:
    """uint8 ``[c, H, W]`` (c of 1 or 3) -> a PNG file (zlib level 9)."""
    arr = rearrange(img, "c h w -> h w c").numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def png_bits_per_dim(img: Tensor) -> float:
    """Size of ``img`` under PNG in bits per dimension: the complexity estimate of Serra et al."""
    return 8.0 * len(png_bytes(img)) / img.numel()
