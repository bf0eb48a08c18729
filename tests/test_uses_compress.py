"""Lossless compression: bit-exact round trips (pixel priors with mixture and categorical
heads, a VAE of one or two levels, through the CLI with nothing but the file to decompress),
file size against the model's -log2 p (per level), one-line errors, and the
portability contract: exact across thread counts and processes, otherwise one line naming
what differs from the recorded environment (pixel hash, range decoder failure, format 1)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compress_reference import channel_log_probs, naive_autoregress
from einops import rearrange
from PIL import Image
from test_uses_common import (
    LEVELS,
    invoke,
    load_levels,
    model_args,
    one_error_line,
    save_levels,
    save_pixel_prior,
    save_two_level,
    save_two_stage,
    single_thread,  # noqa: F401 (autouse fixture)
    write_npz,
)

from vqprior.data import uint8_to_float
from vqprior.io import content_hash
from vqprior.nn.mixture import mixture_log_prob
from vqprior.uses import compress as compress_module
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


@pytest.mark.parametrize("levels", LEVELS)
def test_vae_round_trip_is_bit_exact_and_codes_every_level(tmp_path: Path, levels: int) -> None:
    paths = save_levels(tmp_path, levels)
    models = load_levels(paths)
    for n in (1, 3, 7):
        data = check_round_trip(models, random_images(n, (1, 8, 8), seed=n), batch_size=3)
    header, _ = unpack(data, "f")  # every prior's hash and path, top first
    priors = [paths["prior"], *([paths["bottom"]] if levels == 2 else [])]
    assert header["levels"] == list(models.model.names)
    assert header["prior_hashes"] == [content_hash(p) for p in priors]
    assert header["prior_paths"] == [str(p.resolve()) for p in priors]
    assert header["prior_hash"] == "+".join(header["prior_hashes"])
    assert header["vae_hash"] == content_hash(paths["vae"])


@pytest.mark.parametrize("levels", LEVELS)
def test_part_bits_are_each_levels_log_prob(tmp_path: Path, levels: int) -> None:
    models = load_levels(save_levels(tmp_path, levels))
    model = models.model
    assert model.vae is not None
    x8 = random_images(3, (1, 8, 8))
    result = compress_images(models, x8, ["a", "b", "c"], batch_size=2)
    x = uint8_to_float(x8)
    with torch.no_grad():
        codes = model.encode(x)
        want = [-float(lp.sum()) / math.log(2) for lp in model.level_log_probs(codes)]
        want.append(float(model.vae.decoder_nats(x, *codes).sum()) / math.log(2))
    assert list(result.part_bits) == [*model.names, "decoder"]
    assert list(result.part_bits.values()) == pytest.approx(want, rel=1e-4)
    assert result.ideal_bits == pytest.approx(sum(want), rel=1e-4)


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


def test_reference_channel_log_probs_are_the_conditionals() -> None:
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, 3 * 1 + 2 * 3 * 3 + 3 * 3, 2, 3, generator=gen)  # C=3, M=3
    x = uint8_to_float(torch.randint(0, 256, (2, 3, 2, 3), generator=gen, dtype=torch.uint8))
    want = mixture_log_prob(x, params, 3)
    for c in range(3):
        lp = channel_log_probs(params, x, c, 3)  # [b, 256, h, w]
        assert torch.allclose(lp.logsumexp(1), torch.zeros(2, 2, 3), atol=1e-4)
        idx = ((x[:, c] + 1) * 127.5).round().long()
        assert torch.allclose(lp.gather(1, idx[:, None])[:, 0], want[:, c], atol=1e-5)


def test_round_trip_with_the_reference_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compress_module, "autoregress", naive_autoregress)
    monkeypatch.setattr(compress_module, "mixture_channel_log_probs", channel_log_probs)
    for case in ("rgb-mixture", "rgb-categorical"):
        models = load_models(save_pixel_prior(tmp_path, case))
        check_round_trip(models, random_images(3, (3, 5, 4)), batch_size=2)
    for levels in LEVELS:
        models = load_levels(save_levels(tmp_path / f"levels{levels}", levels))
        check_round_trip(models, random_images(2, (1, 8, 8)), batch_size=2)


def test_cli_two_level_round_trip_needs_only_the_file(tmp_path: Path) -> None:
    paths = save_levels(tmp_path, 2)
    npz = write_npz(tmp_path / "x.npz", 5, (8, 8))
    x8 = torch.from_numpy(np.load(npz)["x"])[:, None]
    packed, out = tmp_path / "x.vqz", tmp_path / "out"
    result = invoke(
        "compress", *model_args(paths), str(npz), "-o", str(packed), "--batch-size", "2"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    parts = report["model_bits_per_image"]  # the figures per level, and the decoder's
    assert list(parts) == ["bottom", "decoder", "top"]  # (sorted keys)
    assert sum(parts.values()) == pytest.approx(report["model_bits"] / 5)
    result = invoke("decompress", str(packed), "-o", str(out))  # priors and VAE: the file's
    assert result.exit_code == 0, result.output
    assert torch.equal(read_pngs(out, 5), x8)
    other = save_two_level(tmp_path / "other", seed=1)
    line = one_error_line(
        invoke("decompress", str(packed), "-o", str(tmp_path / "o2"), "--bottom-prior",
               str(paths["prior"]))
    )  # fmt: skip
    assert "pass the top prior as --prior" in line
    line = one_error_line(
        invoke("decompress", str(packed), "-o", str(tmp_path / "o3"), "--prior",
               str(other["top"]), "--bottom-prior", str(other["bottom"]), "--vae",
               str(other["vae"]))
    )  # fmt: skip
    assert "compressed with a prior of hash" in line
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ------------------------------------------------------------------ portability contract
def gray_digits_setup(tmp_path: Path, n: int = 6) -> tuple[Path, Path, torch.Tensor]:
    """A gray 8x8 mixture prior and an .npz of ``n`` random 8x8 images (x8 [n, 1, 8, 8])."""
    prior = save_pixel_prior(tmp_path, "gray-mixture", 8, 8)
    npz = write_npz(tmp_path / "x.npz", n, (8, 8))
    return prior, npz, torch.from_numpy(np.load(npz)["x"])[:, None]


def decompress_elsewhere(packed: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """``vqprior decompress`` in a fresh interpreter with extra environment variables."""
    cmd = [sys.executable, "-m", "vqprior.cli", "decompress", str(packed), "-o", str(out)]
    return subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )


def read_pngs(out: Path, n: int) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(out / f"{i:05d}.png")))[None] for i in range(n)]
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_header_records_the_environment_and_the_pixel_hash(tmp_path: Path) -> None:
    prior, _, x8 = gray_digits_setup(tmp_path, 2)
    torch.set_num_threads(2)
    data = compress_images(load_models(prior), x8, ["a", "b"]).data
    assert torch.get_num_threads() == 2  # the coding path's one thread is restored
    header, _ = unpack(data, "f")
    env = header["env"]
    assert env["threads"] == 1 and env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["device_name"] and env["vqprior"] and env["constriction"]
    assert len(header["pixels_sha256"]) == 64


def test_another_process_and_thread_count_decodes_bit_exact(tmp_path: Path) -> None:
    prior, npz, x8 = gray_digits_setup(tmp_path)
    packed = tmp_path / "x.vqz"
    torch.set_num_threads(2)  # compress with two threads, decompress elsewhere with one
    result = invoke("compress", "--prior", str(prior), str(npz), "-o", str(packed))
    assert result.exit_code == 0, result.output
    proc = decompress_elsewhere(packed, tmp_path / "out", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(read_pngs(tmp_path / "out", len(x8)), x8)


def test_another_cpu_instruction_set_decodes_exact_or_names_it(tmp_path: Path) -> None:
    """ATen's portable kernels (no AVX) round differently, as on another CPU: exact, or one
    line naming the CPU capability; never wrong PNGs."""
    prior, npz, x8 = gray_digits_setup(tmp_path)
    packed, out = tmp_path / "x.vqz", tmp_path / "out"
    invoke("compress", "--prior", str(prior), str(npz), "-o", str(packed))
    proc = decompress_elsewhere(packed, out, ATEN_CPU_CAPABILITY="default")
    if proc.returncode == 0:
        assert torch.equal(read_pngs(out, len(x8)), x8)
    else:
        assert "cpu_capability" in error_line(proc) and not out.exists()


def other_stream(tmp_path: Path) -> tuple[Path, bytes, list[np.ndarray]]:
    """A prior, the file of 3 images, and the (valid) streams of 3 other images."""
    prior, _, x8 = gray_digits_setup(tmp_path, 3)
    models = load_models(prior)
    data = compress_images(models, x8, ["a", "b", "c"]).data
    _, streams = unpack(compress_images(models, x8.flip(0), ["a", "b", "c"]).data, "f")
    return prior, data, streams


def test_a_payload_of_other_pixels_is_caught_by_the_pixel_hash(tmp_path: Path) -> None:
    prior, data, streams = other_stream(tmp_path)
    header, mine = unpack(data, "f")
    flipped = mine[0].copy()
    flipped[0] ^= np.uint32(1 << 31)
    for payload in (streams, [flipped]):  # decodes fine, to other pixels
        packed, out = tmp_path / "x.vqz", tmp_path / "out"
        packed.write_bytes(pack(header, payload))
        line = one_error_line(invoke("decompress", str(packed), "-o", str(out)))
        assert "does not decode to the compressed pixels" in line, line
        assert "match the ones it records: the payload was altered" in line and not out.exists()
    assert "pixel hash mismatch" in line or "range decoder failed" in line


def test_a_different_recorded_environment_is_named(tmp_path: Path) -> None:
    prior, data, streams = other_stream(tmp_path)
    header, mine = unpack(data, "f")
    models = load_models(prior)
    moved = dict(header, env=dict(header["env"], torch="1.0.0", device_name="Other CPU"))
    got, _ = decompress_bytes(pack(moved, mine), models)  # recorded elsewhere, decodes exactly
    assert torch.equal(got, decompress_bytes(data, models)[0])
    with pytest.raises(CompressedFileError, match="pixel hash mismatch") as err:
        decompress_bytes(pack(moved, streams), models, "x.vqz")
    line = str(err.value)
    assert f"torch 1.0.0 (here {torch.__version__})" in line and "device_name Other CPU" in line
    assert "\n" not in line


def test_a_failing_range_decoder_gives_the_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import constriction

    class Failing:
        def __init__(self, words: np.ndarray) -> None:
            pass

        def decode(self, *args: object) -> np.ndarray:
            raise AssertionError("Tried to decode from compressed data that is invalid")

    prior, data, _ = other_stream(tmp_path)
    header, mine = unpack(data, "f")
    # a capability other than this machine's (the line names what differs)
    other = "AVX512" if header["env"]["cpu_capability"] == "AVX2" else "AVX2"
    moved = pack(dict(header, env=dict(header["env"], cpu_capability=other)), mine)
    monkeypatch.setattr(constriction.stream.queue, "RangeDecoder", Failing)
    with pytest.raises(CompressedFileError) as err:
        decompress_bytes(moved, load_models(prior), "x.vqz")
    line = str(err.value)
    assert (
        "range decoder failed: Tried to decode" in line and f"cpu_capability {other} (here" in line
    )


def test_format_1_files_decode_and_other_versions_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prior, data, streams = other_stream(tmp_path)
    header, mine = unpack(data, "f")
    models = load_models(prior)
    old = {k: v for k, v in header.items() if k not in ("env", "pixels_sha256")}
    with caplog.at_level(logging.WARNING):
        got, _ = decompress_bytes(pack(old, mine, version=1), models, "old.vqz")
    assert torch.equal(got, decompress_bytes(data, models)[0])
    assert "format version 1 (no pixel hash)" in caplog.text
    packed, out = tmp_path / "before-levels.vqz", tmp_path / "out"  # a format 2 file written
    before = {k: v for k, v in header.items() if k not in ("levels", "prior_hashes", "prior_paths")}
    packed.write_bytes(pack(before, mine))  # before two-level models: its prior_path alone
    result = invoke("decompress", str(packed), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert torch.equal(read_pngs(out, 3), decompress_bytes(data, models)[0])
    with pytest.raises(CompressedFileError, match="format version 3 .written by a newer vqprior"):
        decompress_bytes(pack(header, mine, version=3), models)
    with pytest.raises(CompressedFileError, match="version 2 header without env"):
        decompress_bytes(pack(old, mine), models)
