"""Shared builders for the uses tests (tiny random models saved as exports), and tests of
image reading/conversion and model loading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from vqprior import VQVAE, PixelCNN, PixelCNNConfig, VQVAEConfig
from vqprior.cli import cli
from vqprior.io import CheckpointError, content_hash
from vqprior.uses.images import exact_images, fit_images, read_images
from vqprior.uses.models import VAE_RECORD, load_models

PIXEL_CASES: dict[str, dict[str, Any]] = {
    "gray-mixture": dict(data="pixels", in_channels=1, head="mixture", num_mixtures=2),
    "rgb-mixture": dict(data="pixels", in_channels=3, head="mixture", num_mixtures=2),
    "rgb-categorical": dict(data="pixels", in_channels=3, head="categorical", num_bins=256),
}


def save_pixel_prior(root: Path, case: str, height: int = 5, width: int = 4) -> Path:
    torch.manual_seed(0)
    cfg = PixelCNNConfig(**PIXEL_CASES[case], height=height, width=width, channels=12, num_layers=2)
    model = PixelCNN(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # a sharper random model: far from uniform
    return model.save_pretrained(root / f"prior-{case}-{height}x{width}")


def save_two_stage(root: Path, recon: str = "mixture") -> tuple[Path, Path]:
    """A VAE (1 channel, 8x8 images -> 4x4 codes) and a codes prior recording its hash."""
    torch.manual_seed(0)
    vae = VQVAE(
        VQVAEConfig(
            in_channels=1,
            hidden_channels=8,
            res_channels=4,
            num_res_blocks=0,
            downsample=2,
            num_codes=6,
            code_dim=4,
            recon=recon,
            num_mixtures=2,
        )
    )
    vae_path = vae.save_pretrained(root / f"vae-{recon}")
    prior = PixelCNN(
        PixelCNNConfig(data="codes", num_codes=6, height=4, width=4, channels=8, num_layers=2)
    )
    record = {
        "vae_hash": content_hash(vae_path),
        "vae_path": str(vae_path),
        "image_shape": [1, 8, 8],
    }
    prior_path = prior.save_pretrained(
        root / f"prior-codes-{recon}", extra_files={VAE_RECORD: json.dumps(record)}
    )
    return prior_path, vae_path


def write_npz(path: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8))
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def one_error_line(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One torch thread: the per-element steps are tiny, and on a shared CPU extra threads
    only contend (30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ tests
def test_folder_and_npz_read_as_uint8(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(gray).save(folder / "a.png")
    Image.fromarray(rgb).save(folder / "b.png")
    found = read_images(folder)
    assert found.names == ["a.png", "b.png"] and found.from_files
    assert torch.equal(found.images[0][0], torch.from_numpy(gray))
    assert torch.equal(found.images[1], torch.from_numpy(rgb).permute(2, 0, 1))
    x = fit_images(found, 3, 4, 5)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.uint8
    npz = write_npz(tmp_path / "x.npz", 3, (6, 7, 3))
    found = read_images(npz)
    assert found.names == ["00000", "00001", "00002"] and not found.from_files
    assert torch.equal(
        exact_images(found, 3, 6, 7)[1], torch.from_numpy(np.load(npz)["x"][1]).permute(2, 0, 1)
    )
    with pytest.raises(ValueError, match="lossless"):
        exact_images(found, 1, 6, 7)


def test_unconvertible_channels_and_missing_path(tmp_path: Path) -> None:
    found = read_images(write_npz(tmp_path / "x.npz", 2, (4, 4, 2)))
    with pytest.raises(ValueError, match="2 channels and cannot be converted"):
        fit_images(found, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_images(tmp_path / "nope")


def test_two_stage_loads_and_refuses_another_vae(tmp_path: Path) -> None:
    prior, vae = save_two_stage(tmp_path)
    models = load_models(prior)  # the VAE comes from the record
    assert models.vae is not None and models.image_shape == (1, 8, 8)
    _, other = save_two_stage(tmp_path / "other", recon="mse")
    with pytest.raises(CheckpointError, match="not the one this prior was trained on"):
        load_models(prior, other)
