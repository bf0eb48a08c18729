"""Per-image likelihood scores, NLL heatmaps and the input-complexity-corrected OOD score.

For each image: bits/dim under the model (pixel prior: exact; codes prior: the prior's bits
of the codes plus the VAE mixture decoder's bits of the image given the codes, an upper
bound on -log2 p(x); with an mse VAE only the prior's part), its size under PNG in bits/dim,
and ``complexity_corrected = bits_per_dim - png_bits_per_dim`` (Serra et al. 2020, "Input
complexity and out-of-distribution detection with likelihood-based generative models"): the
default OOD score, higher meaning more out-of-distribution.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vqprior.data import uint8_to_float
from vqprior.io import atomic_write_bytes, atomic_write_text
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE
from vqprior.nn.mixture import mixture_log_prob
from vqprior.uses.images import fit_images, png_bits_per_dim, read_images
from vqprior.uses.models import Models, class_labels, load_models

LN2 = math.log(2.0)
DEFAULT_SCORE = "complexity_corrected"


class Scores(NamedTuple):
    """Per image (``[N]`` float64 unless noted): bits/dim, the prior's and decoder's bits
    (codes prior; decoder NaN without a mixture decoder), PNG bits/dim, the corrected score,
    and per-element NLL maps in bits ``[N, H, W]`` (codes: per code, upsampled)."""

    bits_per_dim: Tensor
    prior_bits: Tensor
    decoder_bits: Tensor
    png_bits_per_dim: Tensor
    complexity_corrected: Tensor
    nll_maps: Tensor


def decoder_log_prob(vae: VQVAE, codes: Tensor, x: Tensor) -> Tensor:
    """Nats per element ``[b, c, H, W]`` of images ``x`` under the VAE's mixture decoder given
    ``codes``; raises ValueError for a VAE with ``recon="mse"``."""
    cfg = vae.config
    if cfg.recon != "mixture":
        raise ValueError(
            "the VAE has recon=mse (no discrete likelihood): train it with recon=mixture"
        )
    params = vae.decoder(vae.quantizer.lookup(codes.long()))
    return mixture_log_prob(x, params, cfg.num_mixtures, cfg.num_bins)


def _prior_log_prob(prior: PixelCNN, data: Tensor, labels: Tensor | None) -> Tensor:
    """Element log-probs (nats, shape of ``data``); an unlabelled conditional prior gives
    the mixture over its classes (uniform class prior), mapped through the best class."""
    k = prior.config.num_classes
    if not k:
        return prior.log_prob(data, reduction="none")
    if labels is not None:
        return prior.log_prob(data, cond=labels.to(data.device), reduction="none")
    per_class = torch.stack(
        [
            prior.log_prob(
                data, cond=torch.full((len(data),), y, device=data.device), reduction="none"
            )
            for y in range(k)
        ]
    )  # [k, b, ...]
    totals = per_class.flatten(2).sum(2)  # [k, b]
    best = per_class[totals.argmax(0), torch.arange(len(data))]  # [b, ...]
    marginal = torch.logsumexp(totals, 0) - math.log(k)
    # spread the marginal's difference from the best class evenly over the elements
    shift = (marginal - best.flatten(1).sum(1)) / best[0].numel()
    return best + shift.view(-1, *([1] * (best.dim() - 1)))


@torch.no_grad()
def _score_batch(models: Models, x8: Tensor, labels: Tensor | None) -> tuple[Tensor, ...]:
    """-> (bits/dim [b], prior bits [b], decoder bits [b], NLL map in bits [b, H, W])."""
    dev = next(models.prior.parameters()).device
    x = uint8_to_float(x8).to(dev)
    dims = x[0].numel()
    if models.vae is None:
        lp = _prior_log_prob(models.prior, x.to(models.prior.head_dtype()), labels)
        bits = -lp.flatten(1).sum(1).double() / LN2
        return bits / dims, bits, torch.full_like(bits, math.nan), -lp.sum(1) / LN2
    codes = models.vae.encode(x)
    lp = _prior_log_prob(models.prior, codes, labels)  # [b, h, w]
    prior_bits = -lp.flatten(1).sum(1).double() / LN2
    nll_map = F.interpolate(-lp[:, None].float() / LN2, size=x.shape[-2:], mode="nearest")[:, 0]
    if models.vae.config.recon != "mixture":
        return prior_bits / dims, prior_bits, torch.full_like(prior_bits, math.nan), nll_map
    dec_bits = -decoder_log_prob(models.vae, codes, x).flatten(1).sum(1).double() / LN2
    return (prior_bits + dec_bits) / dims, prior_bits, dec_bits, nll_map


def score_images(
    models: Models, x8: Tensor, labels: Tensor | None = None, batch_size: int = 64
) -> Scores:
    """Score uint8 images ``[N, C, H, W]`` of the model's shape (see :class:`Scores`).

    ``labels`` long ``[N]`` (an ``.npz``'s ``y``): used by a class-conditional prior (checked
    by :func:`class_labels`), ignored by an unconditional one; a conditional prior without
    labels scores the mixture over its classes."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    labels = class_labels(models.prior.config.num_classes, len(x8), data=labels)
    parts = [
        _score_batch(
            models, x8[i : i + batch_size], None if labels is None else labels[i : i + batch_size]
        )
        for i in range(0, len(x8), batch_size)
    ]
    bpd, prior_bits, dec_bits, maps = (torch.cat([p[j].cpu() for p in parts]) for j in range(4))
    png = torch.tensor([png_bits_per_dim(img) for img in x8], dtype=torch.float64)
    return Scores(bpd, prior_bits, dec_bits, png, bpd - png, maps.float())


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


def _rows(names: list[str], s: Scores, codes: bool) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {
            "name": name,
            "bits_per_dim": f"{float(s.bits_per_dim[i]):.6f}",
            "png_bits_per_dim": f"{float(s.png_bits_per_dim[i]):.6f}",
            DEFAULT_SCORE: f"{float(s.complexity_corrected[i]):.6f}",
        }
        if codes:
            dec = float(s.decoder_bits[i])
            row["prior_bits"] = f"{float(s.prior_bits[i]):.3f}"
            row["decoder_bits"] = "" if math.isnan(dec) else f"{dec:.3f}"
            row["total_bits"] = f"{float(s.prior_bits[i]) + (0.0 if math.isnan(dec) else dec):.3f}"
        rows.append(row)
    return rows


def score(
    prior_dir: str | Path,
    images: str | Path,
    out: str | Path,
    vae_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    heatmaps: bool = True,
) -> dict[str, Any]:
    """Score a folder or ``.npz`` of images: ``out/scores.csv`` and ``out/heatmaps/*.png``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    models = load_models(prior_dir, vae_dir, device)
    found = read_images(images)
    x8 = fit_images(found, *models.image_shape)
    s = score_images(models, x8, found.labels, batch_size)
    out = Path(out)
    rows = _rows(found.names, s, models.vae is not None)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "scores.csv", buf.getvalue())
    vmax = float(torch.quantile(s.nll_maps.flatten()[:1_000_000], 0.99))
    if heatmaps:
        for name, m in zip(found.names, s.nll_maps, strict=True):
            atomic_write_bytes(out / "heatmaps" / f"{Path(name).stem}.png", heatmap_png(m, vmax))
    return {
        "csv": str(out / "scores.csv"),
        "heatmaps": str(out / "heatmaps") if heatmaps else None,
        "num_images": len(rows),
        "mean_bits_per_dim": float(s.bits_per_dim.mean()),
        "mean_complexity_corrected": float(s.complexity_corrected.mean()),
        "heatmap_scale_bits": [0.0, vmax],
        "ood_score": DEFAULT_SCORE,
    }
