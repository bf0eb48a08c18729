"""Lossless image compression with a trained prior: range coding (the ``constriction``
library) driven by the model's conditional distributions.

The model is a chain of levels (:class:`~vqprior.models.levels.LevelModel`), coded top
first into one stream per batch. A level: the raster walk :func:`vqprior.sampling.autoregress`
of its prior, given the levels above, visits every element; its ``choose`` function codes the
element's value under the distribution the model gives there (codes: the softmax of the
logits; pixels, mixture head: channel by channel, :func:`mixture_channel_log_probs` given the
earlier channels; categorical head: the softmax of that channel's logits). A pixel prior's one
level is the image; through a VAE (one level or two), the pixels follow under the VAE's
mixture decoder given every level (one decoder pass gives every pixel's parameters; channel
by channel given the earlier channels). Encoder and decoder run the *same* code path
(:class:`Coder` either encodes the known value or decodes it), on batches of the same
composition, so their probabilities are bit-identical.

Probabilities are quantised deterministically to integer frequencies
``floor(p * (2**24 - n)) + 1`` (float64 ``p`` normalised to sum 1, ``n`` symbols), so that no
symbol has zero mass; constriction maps them (deterministically) to its fixed-point model.

Portability contract. The frequencies are a discontinuous function of the model's floats, so
one ulp of difference desynchronises the decoder. Both directions therefore compute the
distributions under fixed settings (:func:`vqprior.uses.container.coding_settings`): one
intra-op thread (``CODING_THREADS``; measured no slower than two on the per-element steps),
autocast off and, on CUDA, deterministic cuDNN without benchmark or TF32. The header records
what else determines the floats (:func:`vqprior.uses.container.environment`: vqprior, torch
and constriction versions, device and CPU model, CPU instruction set, dtypes, thread count)
and the SHA-256 of the original pixels, which decompression checks. Hence: on the same machine
and software decompression is exact whatever the caller's thread count; elsewhere it is
either exact or refused with one line naming what differs from the recorded environment,
never silently wrong pixels. (Another CPU instruction set, e.g. AVX512 against AVX2, does
change the convolutions' last bits; making the floats themselves portable is not attempted.)
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from vqprior.data import uint8_to_float
from vqprior.io import atomic_write_bytes
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE
from vqprior.nn.grid import from_bins, to_bins
from vqprior.nn.mixture import mixture_channel_log_probs
from vqprior.sampling import autoregress
from vqprior.uses.container import (
    CompressedFileError,
    coding_settings,
    env_differences,
    environment,
    header_bytes,
    mismatch_message,
    pack,
    pixels_sha256,
    unpack,
)
from vqprior.uses.images import exact_images, png_bytes, read_images
from vqprior.uses.models import Models, class_labels, load_models

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
PRECISION = 24  # bits of the integer frequencies
CODING_THREADS = 1  # intra-op threads of the coding path, both directions (recorded)


def frequencies(log_probs: Tensor, precision: int = PRECISION) -> np.ndarray:
    """Log-probabilities ``[n, k]`` -> integer frequencies (as float64) ``[n, k]``, each
    ``floor(p * (2**precision - k)) + 1`` of the normalised float64 ``p``: deterministic,
    never zero, summing to at most ``2**precision``."""
    p = log_probs.detach().double().cpu().exp()
    p = p / p.sum(dim=1, keepdim=True)
    k = p.shape[1]
    return (torch.floor(p * float((1 << precision) - k)) + 1.0).numpy()


class Coder:
    """One range-coded stream. ``coder(log_probs [n, k], symbols [n] | None)`` encodes the
    given symbols (encoder) or decodes them (decoder: ``words`` given) and returns them."""

    def __init__(self, words: np.ndarray | None = None) -> None:
        try:
            import constriction
        except ImportError:
            raise ValueError(
                "compress needs the constriction package: pip install 'vqprior[compress]'"
            ) from None

        self.family = constriction.stream.model.Categorical(perfect=False)
        stream = constriction.stream.queue
        self.encoder = stream.RangeEncoder() if words is None else None
        self.decoder = stream.RangeDecoder(words) if words is not None else None
        self.ideal_bits = 0.0  # -log2 of the model's (float) probabilities of the symbols

    def __call__(self, log_probs: Tensor, symbols: Tensor | None) -> Tensor:
        freqs = frequencies(log_probs)
        if self.encoder is not None:
            assert symbols is not None
            sym = symbols.detach().long().cpu()
            self.encoder.encode(sym.numpy().astype(np.int32), self.family, freqs)
            picked = log_probs.detach().double().cpu().gather(1, sym[:, None])
            self.ideal_bits -= float(picked.sum()) / LN2
            return symbols
        assert self.decoder is not None
        try:
            decoded = self.decoder.decode(self.family, freqs).astype(np.int64)
        except Exception as err:  # a desynchronised stream can be invalid for the model
            raise CompressedFileError(f"the range decoder failed: {_one_line(err)}") from None
        return torch.from_numpy(decoded).to(log_probs.device)

    def words(self) -> np.ndarray:
        assert self.encoder is not None
        return np.asarray(self.encoder.get_compressed(), dtype=np.uint32)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _environment(models: Models, threads: int) -> dict[str, Any]:
    model = models.model
    dtypes = {"dtype": model.priors[0].param_dtype()}  # the top prior; then the levels below
    below = zip(model.names[1:], model.priors[1:], strict=True)
    dtypes.update({f"{name}_dtype": prior.param_dtype() for name, prior in below})
    if models.vae is not None:
        dtypes["vae_dtype"] = next(models.vae.parameters()).dtype
    return environment(next(models.prior.parameters()).device, dtypes, threads)


def _walk_method(models: Models) -> str:
    from vqprior.nn.step import supports_steps

    steps = all(supports_steps(p.backbone) for p in models.model.priors)
    return "cached" if steps else "naive"


def _prior_choose(prior: PixelCNN, coder: Coder, known: Tensor | None) -> Any:
    """``choose`` for :func:`autoregress`: code each element; ``known`` holds the symbols
    (codes [n, h, w], or pixel bins [n, C, H, W]) when encoding, None when decoding."""
    cfg = prior.config

    def choose(out: Tensor, r: int, c: int, group: int | None) -> Tensor:
        if cfg.data == "codes":
            lp = torch.log_softmax(out.float(), dim=1)
            return coder(lp, None if known is None else known[:, r, c])
        values = torch.zeros(out.shape[0], cfg.in_channels, dtype=out.dtype, device=out.device)
        channels = range(cfg.in_channels) if group is None else [group]
        for ch in channels:
            if cfg.head == "mixture":
                grid = values[:, :, None, None]
                lp = mixture_channel_log_probs(
                    out[:, :, None, None], grid, ch, cfg.num_mixtures, cfg.num_bins
                )
                lp = lp[:, :, 0, 0]
            else:
                lp = torch.log_softmax(
                    out[:, ch * cfg.num_bins : (ch + 1) * cfg.num_bins].float(), 1
                )
            sym = coder(lp, None if known is None else known[:, ch, r, c])
            values[:, ch] = from_bins(sym, cfg.num_bins, values.dtype)
        return values

    return choose


def _decoder_pixels(vae: VQVAE, coder: Coder, levels: list[Tensor], known: Tensor | None) -> Tensor:
    """Code the pixels under the VAE's mixture decoder given every level (top first) -> uint8
    [n, C, H, W]; ``known`` holds the pixels (long) when encoding, None when decoding."""
    vcfg = vae.config
    params = vae.decoder_output(*levels)  # [n, P, H, W]
    n, _, h, w = params.shape
    x = torch.zeros(n, vcfg.in_channels, h, w, dtype=torch.float32, device=params.device)
    for ch in range(vcfg.in_channels):
        lp = mixture_channel_log_probs(params, x, ch, vcfg.num_mixtures, vcfg.num_bins)
        lp = lp.permute(0, 2, 3, 1).reshape(n * h * w, vcfg.num_bins)  # [(n h w), bins]
        sym = coder(lp, None if known is None else known[:, ch].reshape(-1))
        x[:, ch] = from_bins(sym.view(n, h, w), vcfg.num_bins)
    return to_bins(x, vcfg.num_bins).to(torch.uint8)


def _symbols(prior: PixelCNN, level: Tensor) -> Tensor:
    """A level as the symbols its prior codes: codes long, pixels as their bins."""
    return level.long() if prior.config.data == "codes" else to_bins(level, prior.config.num_bins)


@torch.no_grad()
def code_batch(
    models: Models,
    coder: Coder,
    n: int,
    x8: Tensor | None,
    cond: Tensor | None,
    method: str,
    bits: dict[str, float] | None = None,
) -> Tensor:
    """Encode uint8 images ``x8`` [n, C, H, W] into ``coder`` (returns them), or decode n
    images from it (``x8`` None) -> uint8 [n, C, H, W]: every level top first, each given the
    levels above, then (through a VAE) the pixels given every level. ``bits`` collects each
    part's -log2 p (by level name, and ``decoder``)."""
    model, bits = models.model, {} if bits is None else bits
    dev = models.prior.device
    known = None if x8 is None else model.encode(uint8_to_float(x8.to(dev)))
    levels: list[Tensor] = []
    for i, (name, prior) in enumerate(zip(model.names, model.priors, strict=True)):
        start, symbols = coder.ideal_bits, None if known is None else _symbols(prior, known[i])
        choose = _prior_choose(prior, coder, symbols)
        spatial = model.condition(i, levels)
        levels.append(autoregress(prior, n, choose, model.labels(i, cond), spatial, method))
        bits[name] = bits.get(name, 0.0) + coder.ideal_bits - start
    if model.vae is None:  # a pixel prior: its one level is the image
        return to_bins(levels[0], model.priors[0].config.num_bins).to(torch.uint8)
    start, pixels = coder.ideal_bits, None if x8 is None else x8.to(dev).long()
    x = _decoder_pixels(model.vae, coder, [lv.long() for lv in levels], pixels)
    bits["decoder"] = bits.get("decoder", 0.0) + coder.ideal_bits - start
    return x


def _check_codable(models: Models) -> None:
    bins = models.prior.config.num_bins if models.vae is None else models.vae.config.num_bins
    if models.vae is not None and models.vae.config.recon != "mixture":
        raise ValueError(
            "compressing through a codes prior needs the VAE's mixture decoder (recon=mixture); "
            "this VAE has recon=mse"
        )
    if bins != 256:
        raise ValueError(f"lossless 8-bit coding needs num_bins=256, the model has {bins}")


class Compressed(NamedTuple):
    data: bytes
    ideal_bits: float  # -log2 p of the images under the model's float probabilities
    seconds: float
    part_bits: dict[str, float]  # ideal_bits by part: each level (top first), then "decoder"


def compress_images(
    models: Models,
    x8: Tensor,
    names: list[str],
    labels: Tensor | None = None,
    batch_size: int = 16,
    from_files: bool = False,
) -> Compressed:
    """uint8 images [N, C, H, W] of the model's shape -> the compressed file's bytes."""
    _check_codable(models)
    cond = _labels(models, labels, len(x8))
    method, start, streams, ideal = _walk_method(models), time.perf_counter(), [], 0.0
    dev, parts = models.prior.device, dict[str, float]()
    with coding_settings(CODING_THREADS, dev):
        for i in range(0, len(x8), batch_size):
            coder, batch = Coder(), x8[i : i + batch_size]
            part = None if cond is None else cond[i : i + batch_size]
            code_batch(models, coder, len(batch), batch, part, method, parts)
            streams.append(coder.words())
            ideal += coder.ideal_bits
    header = {
        "env": _environment(models, CODING_THREADS),
        "pixels_sha256": pixels_sha256(x8),
        "num_images": len(x8),
        "image_shape": list(x8.shape[1:]),
        "names": names if from_files else None,  # an .npz's names are its indices
        "from_files": from_files,
        "labels": None if cond is None else cond.cpu().tolist(),
        "batch_size": batch_size,
        "method": method,
        "precision": PRECISION,
        "device": dev.type,
        "levels": list(models.model.names),
        "prior_hashes": list(models.prior_hashes),  # one per level, top first
        "prior_paths": [str(p.resolve()) for p in models.prior_paths],
        "prior_hash": models.prior_hash,  # the hashes "+"-joined (a one-level model: its hash)
        "prior_path": str(models.prior_path.resolve()),  # the top prior
        "vae_hash": models.vae_hash,
        "vae_path": None if models.vae_path is None else str(models.vae_path.resolve()),
    }
    return Compressed(pack(header, streams), ideal, time.perf_counter() - start, parts)


def _labels(models: Models, labels: Tensor | None, n: int) -> Tensor | None:
    k, missing = models.model.num_classes, "give an .npz with labels y"
    cond = class_labels(k, n, data=labels, missing=missing)
    return None if cond is None else cond.to(models.prior.device)


def check_models(header: dict[str, Any], models: Models, where: str | Path) -> None:
    """Refuse (one line) models other than the ones that wrote ``header`` (``prior_hash``:
    every level's prior hash, top first, joined by ``+``)."""
    for what, want, got in (
        ("prior", header["prior_hash"], models.prior_hash),
        ("VAE", header["vae_hash"], models.vae_hash),
    ):
        if want != got:
            raise CompressedFileError(
                f"{where} was compressed with a {what} of hash {want} but this {what} has hash "
                f"{got}: pass the {what} it was compressed with"
            )


def decompress_bytes(data: bytes, models: Models, where: str = "file") -> tuple[Tensor, dict]:
    """The compressed bytes -> (uint8 images [N, C, H, W], header). Pixels that do not match
    the recorded hash, or a range decoder that fails, raise CompressedFileError (one line
    naming what differs from the recorded environment)."""
    header, streams = unpack(data, where)
    check_models(header, models, where)
    n, bs = header["num_images"], header["batch_size"]
    cond = None if header["labels"] is None else torch.tensor(header["labels"])
    dev = next(models.prior.parameters()).device
    if dev.type != header["device"]:  # other kernels round differently: the streams desync
        raise CompressedFileError(
            f"{where} was compressed on {header['device']}: decompress with --device "
            f"{header['device']} (this run uses {dev.type})"
        )
    legacy = "env" not in header  # format 1: the caller's settings, nothing to verify against
    threads = torch.get_num_threads() if legacy else header["env"]["threads"]
    here = _environment(models, threads)
    out = []
    try:
        with nullcontext() if legacy else coding_settings(threads, dev):
            for j, words in enumerate(streams):
                count = min(bs, n - j * bs)
                part = None if cond is None else cond[j * bs : j * bs + count].to(dev)
                coder = Coder(words)
                out.append(code_batch(models, coder, count, None, part, header["method"]).cpu())
    except CompressedFileError as err:
        raise CompressedFileError(mismatch_message(header, here, where, str(err))) from None
    x8 = torch.cat(out)
    if legacy:
        logger.warning("%s is format version 1 (no pixel hash): its pixels are unverified", where)
    elif pixels_sha256(x8) != header["pixels_sha256"]:
        raise CompressedFileError(mismatch_message(header, here, where, "pixel hash mismatch"))
    elif diffs := env_differences(header["env"], here):
        logger.info("%s decoded exactly although compressed under %s", where, ", ".join(diffs))
    return x8, header


def _output_names(header: dict[str, Any]) -> list[str]:
    names = header["names"]
    if not header["from_files"] or names is None:
        return [f"{i:05d}.png" for i in range(header["num_images"])]
    stems = [Path(name).stem for name in names]
    unique = len(set(stems)) == len(stems)
    return [f"{s}.png" if unique else f"{name}.png" for s, name in zip(stems, names, strict=True)]


def compress(
    prior_dir: str | Path,
    images: str | Path,
    out_file: str | Path,
    vae_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compress a folder or ``.npz`` of images (exactly the model's shape) into ``out_file``.
    A two-level model is its top prior (``prior_dir``) and bottom prior (``bottom_prior_dir``);
    the file records both, so :func:`decompress` needs nothing else."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    models = load_models(prior_dir, vae_dir, device, bottom_prior_dir)
    found = read_images(images)
    x8 = exact_images(found, *models.image_shape)
    result = compress_images(models, x8, found.names, found.labels, batch_size, found.from_files)
    atomic_write_bytes(out_file, result.data)
    size = len(result.data)
    png = sum(len(png_bytes(img)) for img in x8)
    return {
        "file": str(out_file),
        "num_images": len(x8),
        "bytes": size,
        "header_bytes": header_bytes(result.data),
        "bytes_per_image": size / len(x8),
        "model_bits": result.ideal_bits,
        "model_bits_per_image": {k: v / len(x8) for k, v in result.part_bits.items()},
        "file_bits_over_model_bits": 8 * size / result.ideal_bits,
        "bits_per_dim": 8 * size / x8.numel(),
        "png_bytes_per_image": png / len(x8),
        "seconds_per_image": result.seconds / len(x8),
    }


def decompress(
    file: str | Path,
    out_dir: str | Path,
    prior_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    device: str | None = None,
    bottom_prior_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Decompress ``file`` into PNGs in ``out_dir`` (the priors and VAE default to those it
    records: every level's prior, top first, and the VAE)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"compressed file {path} not found")
    data = path.read_bytes()
    header, _ = unpack(data, path)
    device = device or header["device"]
    recorded = header.get("prior_paths") or [header["prior_path"]]  # one-level files: a path
    models = load_models(
        prior_dir or recorded[0],
        vae_dir or header["vae_path"],
        device,
        bottom_prior_dir or (recorded[1] if len(recorded) > 1 else None),
    )
    start = time.perf_counter()
    x8, header = decompress_bytes(data, models, str(path))
    seconds = time.perf_counter() - start
    names = _output_names(header)
    for name, img in zip(names, x8, strict=True):
        atomic_write_bytes(Path(out_dir) / name, png_bytes(img))
    return {
        "out": str(out_dir),
        "num_images": len(names),
        "seconds_per_image": seconds / len(names),
    }
