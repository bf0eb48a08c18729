"""Lossless compression: bit-exact round trips (pixel priors with mixture and categorical
heads, two-stage), file size against the model's -log2 p, one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from test_uses_common import (
    invoke,
    one_error_line,
    save_pixel_prior,
    save_two_stage,
    single_thread,  # noqa: F401 (autouse fixture)
    write_npz,
)

from vqprior.data import uint8_to_float
from vqprior.nn.mixture import mixture_log_prob
from vqprior.uses import compress as compress_module
from vqprior.uses import fallback
from vqprior.uses.compress import compress_images, decompress_bytes, frequencies
from vqprior.uses.container import CompressedFileError, header_bytes, pack, unpack
from vqprior.uses.models import load_models

pytest.importorskip("constriction")


def random_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)


def test_frequencies_are_positive_and_bounded() -> None:
    lp = torch.log_softmax(torch.randn(50, 256, dtype=torch.float64) * 8, dim=1)
    f = frequencies(lp)
    assert (f >= 1).all() and (f == np.floor(f)).all()
    assert (f.sum(1) <= 2**24).all() and (f.sum(1) > 2**24 - 300).all()
    order = np.argsort(lp.numpy(), axis=1)
    assert (np.diff(np.take_along_axis(f, order, 1), axis=1) >= 0).all()  # monotone in p


def check_round_trip(models, x8: torch.Tensor, batch_size: int) -> bytes:
    names = [f"img{i}.png" for i in range(len(x8))]
    result = compress_images(models, x8, names, batch_size=batch_size, from_files=True)
    got, header = decompress_bytes(result.data, models)
    assert got.dtype == torch.uint8 and torch.equal(got, x8)
    assert header["names"] == names
    # the payload is within 1% (plus the range coder's flush words) of -log2 p under the model
    payload_bits = 8 * (len(result.data) - header_bytes(result.data))
    streams = math.ceil(len(x8) / batch_size)
    assert payload_bits <= 1.01 * result.ideal_bits + 64 * streams
    return result.data


@pytest.mark.parametrize("case", ["gray-mixture", "rgb-mixture", "rgb-categorical"])
@pytest.mark.parametrize("size", [(5, 4), (3, 6)])
def test_pixel_prior_round_trip_is_bit_exact(
    tmp_path: Path, case: str, size: tuple[int, int]
) -> None:
    models = load_models(save_pixel_prior(tmp_path, case, *size))
    c = 1 if case.startswith("gray") else 3
    for n, batch_size in ((1, 4), (3, 4), (7, 4)):  # one, a partial and two batches
        x8 = random_images(n, (c, *size), seed=n)
        check_round_trip(models, x8, batch_size)


def test_model_bits_match_log_prob(tmp_path: Path) -> None:
    models = load_models(save_pixel_prior(tmp_path, "rgb-mixture"))
    x8 = random_images(3, (3, 5, 4))
    result = compress_images(models, x8, ["a", "b", "c"], batch_size=2)
    with torch.no_grad():
        want = -float(models.prior.log_prob(uint8_to_float(x8)).sum()) / math.log(2)
    assert result.ideal_bits == pytest.approx(want, rel=1e-4)


def test_two_stage_round_trip_is_bit_exact(tmp_path: Path) -> None:
    prior, vae = save_two_stage(tmp_path)
    models = load_models(prior, vae)
    for n in (1, 3, 7):
        check_round_trip(models, random_images(n, (1, 8, 8), seed=n), batch_size=3)


def test_two_stage_needs_a_mixture_decoder(tmp_path: Path) -> None:
    prior, vae = save_two_stage(tmp_path, recon="mse")
    models = load_models(prior, vae)
    with pytest.raises(ValueError, match="recon=mixture"):
        compress_images(models, random_images(1, (1, 8, 8)), ["a"])


def test_corrupt_truncated_and_other_model_files(tmp_path: Path) -> None:
    models = load_models(save_pixel_prior(tmp_path, "gray-mixture"))
    data = compress_images(models, random_images(2, (1, 5, 4)), ["a", "b"]).data
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    for bad, needle in (
        (bytes(flipped), "corrupt or truncated"),
        (data[:-3], "corrupt or truncated"),
        (data[:6], "truncated"),
        (b"PNG not ours" * 4, "not a vqprior compressed file"),
    ):
        with pytest.raises(CompressedFileError, match=needle):
            decompress_bytes(bad, models)
    other = load_models(save_pixel_prior(tmp_path / "o", "gray-mixture", 4, 5))
    with pytest.raises(CompressedFileError, match="compressed with a prior of hash"):
        decompress_bytes(data, other)
    header, streams = unpack(data, "f")
    assert header["num_images"] == 2 and header["device"] == "cpu"
    with pytest.raises(CompressedFileError, match="decompress with --device cuda"):
        decompress_bytes(pack(dict(header, device="cuda"), streams), models)


def test_cli_round_trip_names_and_errors(tmp_path: Path) -> None:
    prior = save_pixel_prior(tmp_path, "rgb-categorical")
    folder = tmp_path / "imgs"
    folder.mkdir()
    x8 = random_images(3, (3, 5, 4))
    for name, img in zip(("cat.png", "dog.bmp", "emu.png"), x8, strict=True):
        Image.fromarray(rearrange(img, "c h w -> h w c").numpy()).save(folder / name)
    packed = tmp_path / "imgs.vqz"
    result = invoke("compress", "--prior", str(prior), str(folder), "-o", str(packed))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = invoke("decompress", str(packed), "-o", str(out))  # the prior comes from the file
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png", "emu.png"]
    for name, img in zip(("cat.png", "dog.png", "emu.png"), x8, strict=True):
        with Image.open(out / name) as im:
            assert np.array_equal(np.asarray(im), rearrange(img, "c h w -> h w c").numpy())
    npz = write_npz(tmp_path / "x.npz", 2, (5, 4, 3))
    result = invoke("compress", "--prior", str(prior), str(npz), "-o", str(packed))
    assert result.exit_code == 0, result.output
    result = invoke("decompress", str(packed), "-o", str(tmp_path / "n"))
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["00000.png", "00001.png"]
    packed.write_bytes(packed.read_bytes()[:-10])
    assert "corrupt or truncated" in one_error_line(
        invoke("decompress", str(packed), "-o", str(out))
    )
    wrong = write_npz(tmp_path / "w.npz", 1, (6, 4, 3))
    line = one_error_line(invoke("compress", "--prior", str(prior), str(wrong), "-o", str(packed)))
    assert "lossless" in line
    other = save_pixel_prior(tmp_path / "o", "rgb-categorical", 4, 5)
    invoke("compress", "--prior", str(prior), str(npz), "-o", str(packed))
    line = one_error_line(invoke("decompress", str(packed), "--prior", str(other), "-o", str(out)))
    assert "compressed with a prior of hash" in line


def test_fallback_channel_log_probs_are_the_conditionals() -> None:
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, 3 * 1 + 2 * 3 * 3 + 3 * 3, 2, 3, generator=gen)  # C=3, M=3
    x = uint8_to_float(torch.randint(0, 256, (2, 3, 2, 3), generator=gen, dtype=torch.uint8))
    want = mixture_log_prob(x, params, 3)
    for c in range(3):
        lp = fallback.channel_log_probs(params, x, c, 3)  # [b, 256, h, w]
        assert torch.allclose(lp.logsumexp(1), torch.zeros(2, 2, 3), atol=1e-4)
        idx = ((x[:, c] + 1) * 127.5).round().long()
        assert torch.allclose(lp.gather(1, idx[:, None])[:, 0], want[:, c], atol=1e-5)


def test_round_trip_with_the_fallback_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compress_module, "autoregress", fallback.naive_autoregress)
    monkeypatch.setattr(compress_module, "mixture_channel_log_probs", fallback.channel_log_probs)
    for case in ("rgb-mixture", "rgb-categorical"):
        models = load_models(save_pixel_prior(tmp_path, case))
        check_round_trip(models, random_images(3, (3, 5, 4)), batch_size=2)
    prior, vae = save_two_stage(tmp_path)
    check_round_trip(load_models(prior, vae), random_images(2, (1, 8, 8)), batch_size=2)
