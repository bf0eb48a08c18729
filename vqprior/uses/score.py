"""Per-image likelihood scores, per-level NLL heatmaps and the input-complexity-corrected
OOD score.

The model is a chain of levels (:class:`~vqprior.models.levels.LevelModel`): a pixel prior
(one level, the pixels), or a VAE and one prior per level, each given the levels above. For
each image: the bits of every level under its prior, the VAE mixture decoder's bits of the
image given every level, and bits/dim, their sum over the image's dimensions (pixel prior:
exact; otherwise an upper bound on -log2 p(x); with an mse VAE only the priors' part). Then
its size under PNG in bits/dim and ``complexity_corrected = bits_per_dim - png_bits_per_dim``
(Serra et al. 2020, "Input complexity and out-of-distribution detection with likelihood-based
generative models"): the default OOD score, higher meaning more out-of-distribution.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vqprior.data import uint8_to_float
from vqprior.io import atomic_write_bytes, atomic_write_text
from vqprior.models.levels import LevelModel
from vqprior.uses.images import fit_images, png_bits_per_dim, read_images
from vqprior.uses.models import Models, class_labels, load_models

LN2 = math.log(2.0)
DEFAULT_SCORE = "complexity_corrected"


class Scores(NamedTuple):
    """Per image (``[N]`` float64): bits/dim, each level's bits given the levels above (top
    first; a pixel prior: the pixels), the decoder's bits (zero for a pixel prior, NaN without
    a mixture decoder), PNG bits/dim and the corrected score; and per level an NLL map in bits
    ``[N, H, W]`` (each element's bits, summed over channels, upsampled to the image)."""

    bits_per_dim: Tensor
    level_bits: tuple[Tensor, ...]
    decoder_bits: Tensor
    png_bits_per_dim: Tensor
    complexity_corrected: Tensor
    nll_maps: tuple[Tensor, ...]


def element_log_probs(
    model: LevelModel, levels: Sequence[Tensor], labels: Tensor | None
) -> list[Tensor]:
    """Every level's element log-probs (nats, the shape of the level) given the levels above.
    A conditional model without ``labels`` gives the mixture over its classes (uniform class
    prior), mapped through each image's best class, the difference spread evenly over all
    elements of all levels."""
    k = model.num_classes
    if not k or labels is not None:
        return model.level_log_probs(levels, labels, "none")
    b, dev = len(levels[0]), levels[0].device
    per_class = [
        model.level_log_probs(levels, torch.full((b,), y, device=dev), "none") for y in range(k)
    ]  # k lists of one tensor per level
    totals = torch.stack(
        [torch.stack([lp.flatten(1).sum(1) for lp in lps]).sum(0) for lps in per_class]
    )  # [k, b]: each class's log p of every level
    best, rows = totals.argmax(0), torch.arange(b, device=dev)
    count = sum(lp[0].numel() for lp in per_class[0])
    shift = (torch.logsumexp(totals, 0) - math.log(k) - totals.amax(0)) / count  # [b]
    out = []
    for i in range(len(levels)):
        lp = torch.stack([lps[i] for lps in per_class])[best, rows]  # [b, ...]
        out.append(lp + shift.view(-1, *([1] * (lp.dim() - 1))))
    return out


def _decoder_nats(model: LevelModel, x: Tensor, levels: Sequence[Tensor]) -> Tensor:
    """-log p(x | every level) [b]: zero for a pixel prior, NaN for an mse VAE."""
    zeros = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    if model.vae is None:
        return zeros
    if model.vae.config.recon != "mixture":
        return zeros + math.nan
    return model.vae.decoder_nats(x, *levels).double()


@torch.no_grad()
def _score_batch(models: Models, x8: Tensor, labels: Tensor | None) -> tuple[Any, ...]:
    """-> (bits/dim [b], bits per level, decoder bits [b], NLL map in bits per level)."""
    model = models.model
    dev = models.prior.device
    x = uint8_to_float(x8).to(dev)
    levels = model.encode(x)
    lps = element_log_probs(model, levels, None if labels is None else labels.to(dev))
    bits = tuple(-lp.flatten(1).sum(1).double() / LN2 for lp in lps)
    maps = tuple(
        F.interpolate(
            -lp.reshape(len(x), -1, *lp.shape[-2:]).sum(1, keepdim=True).float() / LN2,
            size=x.shape[-2:],
            mode="nearest",
        )[:, 0]
        for lp in lps
    )  # [b, h, w] (channels summed) -> [b, H, W]
    dec_bits = _decoder_nats(model, x, levels) / LN2
    total = torch.stack(bits).sum(0) + dec_bits.nan_to_num(0.0)
    return total / x[0].numel(), bits, dec_bits, maps


def score_images(
    models: Models, x8: Tensor, labels: Tensor | None = None, batch_size: int = 64
) -> Scores:
    """Score uint8 images ``[N, C, H, W]`` of the model's shape (see :class:`Scores`).

    ``labels`` long ``[N]`` (an ``.npz``'s ``y``): used by a class-conditional model (checked
    by :func:`class_labels`), ignored by an unconditional one; a conditional model without
    labels scores the mixture over its classes."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    labels = class_labels(models.model.num_classes, len(x8), data=labels)
    parts = [
        _score_batch(
            models, x8[i : i + batch_size], None if labels is None else labels[i : i + batch_size]
        )
        for i in range(0, len(x8), batch_size)
    ]
    num_levels = len(models.model.priors)

    def cat(j: int, level: int | None = None) -> Tensor:
        return torch.cat([(p[j] if level is None else p[j][level]).cpu() for p in parts])

    bpd, dec_bits = cat(0), cat(2)
    png = torch.tensor([png_bits_per_dim(img) for img in x8], dtype=torch.float64)
    return Scores(
        bpd,
        tuple(cat(1, i) for i in range(num_levels)),
        dec_bits,
        png,
        bpd - png,
        tuple(cat(3, i).float() for i in range(num_levels)),
    )


def heatmap_png(nll_map: Tensor, vmax: float) -> bytes:
    """NLL map ``[H, W]`` (bits) -> an RGB PNG of the same size, colour scale [0, vmax]
    (matplotlib's viridis when installed, else gray)."""
    t = (nll_map.clamp(min=0) / max(vmax, 1e-12)).clamp(0, 1).numpy()
    try:
        from matplotlib import colormaps

        rgb = (colormaps["viridis"](t)[..., :3] * 255).round().astype(np.uint8)
    except ImportError:
        rgb = np.repeat((t * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def level_columns(model: LevelModel) -> list[str]:
    """The CSV's columns of the levels' bits: none for a pixel prior (bits_per_dim is its
    bits), ``prior_bits`` for a one-level VAE, ``<level>_bits`` (top first) for more levels."""
    if model.vae is None:
        return []
    names = ["prior"] if len(model.priors) == 1 else list(model.names)
    return [f"{name}_bits" for name in names]


def _rows(names: list[str], s: Scores, columns: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {
            "name": name,
            "bits_per_dim": f"{float(s.bits_per_dim[i]):.6f}",
            "png_bits_per_dim": f"{float(s.png_bits_per_dim[i]):.6f}",
            DEFAULT_SCORE: f"{float(s.complexity_corrected[i]):.6f}",
        }
        if columns:
            levels = [float(bits[i]) for bits in s.level_bits]
            row.update({col: f"{v:.3f}" for col, v in zip(columns, levels, strict=True)})
            dec = float(s.decoder_bits[i])
            row["decoder_bits"] = "" if math.isnan(dec) else f"{dec:.3f}"
            row["total_bits"] = f"{sum(levels) + (0.0 if math.isnan(dec) else dec):.3f}"
        rows.append(row)
    return rows


def _write_heatmaps(out: Path, names: list[str], levels: Sequence[str], s: Scores) -> dict:
    """One heatmap per image and level, each level on its own colour scale [0, its 99th
    percentile]: ``out/<image>.png`` for one level, ``out/<level>/<image>.png`` for more."""
    scales = {}
    for level, maps in zip(levels, s.nll_maps, strict=True):
        vmax = float(torch.quantile(maps.flatten()[:1_000_000], 0.99))
        scales[level] = [0.0, vmax]
        folder = out if len(levels) == 1 else out / level
        for name, m in zip(names, maps, strict=True):
            atomic_write_bytes(folder / f"{Path(name).stem}.png", heatmap_png(m, vmax))
    return scales


def score(
    prior_dir: str | Path,
    images: str | Path,
    out: str | Path,
    vae_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    heatmaps: bool = True,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a folder or ``.npz`` of images: ``out/scores.csv`` and the heatmaps under
    ``out/heatmaps/`` (see :func:`_write_heatmaps`). A two-level model is its top prior
    (``prior_dir``) and bottom prior (``bottom_prior_dir``)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    models = load_models(prior_dir, vae_dir, device, bottom_prior_dir)
    found = read_images(images)
    x8 = fit_images(found, *models.image_shape)
    s = score_images(models, x8, found.labels, batch_size)
    out = Path(out)
    rows = _rows(found.names, s, level_columns(models.model))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "scores.csv", buf.getvalue())
    names = models.model.names
    scales = _write_heatmaps(out / "heatmaps", found.names, names, s) if heatmaps else None
    return {
        "csv": str(out / "scores.csv"),
        "heatmaps": str(out / "heatmaps") if heatmaps else None,
        "num_images": len(rows),
        "levels": list(names),
        "mean_bits_per_dim": float(s.bits_per_dim.mean()),
        "mean_complexity_corrected": float(s.complexity_corrected.mean()),
        "heatmap_scale_bits": scales,
        "ood_score": DEFAULT_SCORE,
    }
