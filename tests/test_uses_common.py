"""Shared builders for the uses tests (tiny random models saved as exports; a VAE of one or
two levels with its priors, named to a command as ``--prior [--bottom-prior] --vae``), and
tests of image reading/conversion, model loading, and the argument rules every use command
shares: class labels as generate takes them, the priors of a two-level model given in the
wrong places (or of different VAEs) refused with one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from einops import rearrange
from PIL import Image

from vqprior import VQVAE, PixelCNN, PixelCNNConfig, VQVAEConfig
from vqprior.cli import cli
from vqprior.io import CheckpointError, content_hash
from vqprior.uses.images import exact_images, fit_images, read_images
from vqprior.uses.models import VAE_RECORD, Models, check_label, class_labels, load_models

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


def save_conditional_prior(root: Path, classes: int = 3) -> Path:
    """A class-conditional gray 5x4 pixel prior."""
    torch.manual_seed(0)
    cfg = PixelCNNConfig(
        **PIXEL_CASES["gray-mixture"], height=5, width=4, channels=12, num_layers=2,
        num_classes=classes,
    )  # fmt: skip
    return PixelCNN(cfg).save_pretrained(root / f"prior-cond{classes}")


@torch.no_grad()
def spread_codebooks(vae: VQVAE) -> None:
    """Set a random two-level VAE's codebooks to encoder outputs of noise images, top first, so
    that its codes vary (random codebooks leave every code the same one)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, vae.config.in_channels, 8, 8, generator=gen) * 2 - 1

    def spread(book: torch.nn.Module, z: torch.Tensor) -> None:
        rows = rearrange(z, "b d h w -> (b h w) d")
        book.embed.copy_(rows[torch.randperm(len(rows), generator=gen)[: len(book.embed)]])

    top, bottom = vae.codebooks
    z_b = vae.encoder(x)
    spread(top, vae.encoder_top(z_b))
    top_codes = vae.encode_levels(x)[0]  # the bottom codebook sees the top codes' vectors
    spread(bottom, vae._bottom_input(z_b, top.lookup(top_codes)))


def save_two_level(root: Path, seed: int = 0, classes: int = 0) -> dict[str, Path]:
    """A two-level VAE (1 channel, 8x8 images -> bottom 4x4 and top 2x2 codes) and its top and
    bottom priors (``classes``: class-conditional) with the records train-prior writes
    (``level``, the level's grid)."""
    torch.manual_seed(seed)
    vae = VQVAE(
        VQVAEConfig(
            in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=0, downsample=2,
            num_codes=6, code_dim=4, recon="mixture", num_mixtures=2, levels=2,
        )
    )  # fmt: skip
    spread_codebooks(vae)
    vae_path = vae.save_pretrained(root / "vae-two-level")
    record = {"vae_hash": content_hash(vae_path), "vae_path": str(vae_path), "num_codes": 6}
    paths = {"vae": vae_path}
    for level, size, spatial in (("top", 2, 0), ("bottom", 4, 4)):
        prior = PixelCNN(
            PixelCNNConfig(
                data="codes", num_codes=6, height=size, width=size, channels=8, num_layers=2,
                spatial_cond_channels=spatial, num_classes=classes,
            )
        )  # fmt: skip
        rec = {**record, "image_shape": [1, 8, 8], "grid": [size, size], "level": level}
        paths[level] = prior.save_pretrained(
            root / f"prior-{level}", extra_files={VAE_RECORD: json.dumps(rec)}
        )
    return paths


LEVELS = [1, 2]  # the VAEs of the codes tests: one level (save_two_stage) or two


def save_levels(root: Path, levels: int) -> dict[str, Path]:
    """A mixture VAE of 8x8 gray images with ``levels`` levels and its priors: ``prior`` (the
    top one), ``bottom`` (two levels only) and ``vae``."""
    if levels == 1:
        prior, vae = save_two_stage(root)
        return {"prior": prior, "vae": vae}
    paths = save_two_level(root)
    return {"prior": paths["top"], "bottom": paths["bottom"], "vae": paths["vae"]}


def model_args(paths: dict[str, Path], vae: bool = True) -> list[str]:
    """``--prior TOP [--bottom-prior BOTTOM] [--vae DIR]`` for :func:`save_levels`' paths."""
    args = ["--prior", str(paths["prior"])]
    if "bottom" in paths:
        args += ["--bottom-prior", str(paths["bottom"])]
    return [*args, "--vae", str(paths["vae"])] if vae else args


def load_levels(paths: dict[str, Path]) -> Models:
    """:func:`load_models` of :func:`save_levels`' paths."""
    return load_models(paths["prior"], paths["vae"], bottom_prior_dir=paths.get("bottom"))


def write_npz(
    path: Path, n: int, shape: tuple[int, ...], seed: int = 0, labels: list[int] | None = None
) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    if labels is None:
        np.savez(path, x=x)
    else:
        np.savez(path, x=x, y=np.asarray(labels, dtype=np.int64))
    return path


def file_state(*dirs: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``dirs``: a refused command leaves them as they are."""
    return {
        str(p): (p.read_bytes(), p.stat().st_mtime_ns)
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def use_args(command: str, prior: Path, images: Path, out: Path) -> list[str]:
    """Arguments of a use command (or generate) writing under ``out`` (which does not exist)."""
    if command == "generate":
        return ["generate", "--prior", str(prior), "--out", str(out / "s.png"), "--num", "2"]
    if command == "compress":
        return ["compress", "--prior", str(prior), str(images), "-o", str(out / "f.vqz")]
    args = [command, "--prior", str(prior), "--images", str(images), "--out"]
    if command == "score":
        return [*args, str(out / "scores")]
    return [*args, str(out / "c.png"), "--keep", "top:2", "--samples", "1"]


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


def test_class_labels_is_generates_rule() -> None:
    check_label(0, None)
    check_label(3, 2)
    with pytest.raises(ValueError, match="^this prior is unconditional: drop --label$"):
        check_label(0, 0)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"^--label {bad} must lie in \[0, 3\)$"):
            check_label(3, bad)
    assert torch.equal(class_labels(3, 2, label=1), torch.tensor([1, 1]))
    y = torch.tensor([2, 0])
    assert torch.equal(class_labels(3, 2, label=1, data=y), torch.tensor([1, 1]))
    assert torch.equal(class_labels(3, 2, data=y), y)
    assert class_labels(0, 2, data=torch.tensor([7, 9])) is None  # data labels: ignored
    assert class_labels(3, 2) is None  # the caller's default (generate cycles, score mixes)
    with pytest.raises(ValueError, match=r"label y=3 .* \[0, 3\)"):
        class_labels(3, 2, data=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\): give y"):
        class_labels(3, 2, missing="give y")


LABEL_CASES = [
    ("generate", False, ["--label", "3"], None, "this prior is unconditional: drop --label"),
    ("complete", False, ["--label", "3"], None, "this prior is unconditional: drop --label"),
    ("generate", True, ["--label", "3"], None, "--label 3 must lie in [0, 3)"),
    ("complete", True, ["--label", "3"], None, "--label 3 must lie in [0, 3)"),
    ("complete", True, ["--label", "-1"], [0, 1], "--label -1 must lie in [0, 3)"),
    ("complete", True, [], None, "class-conditional (3 classes)"),
    ("compress", True, [], None, "class-conditional (3 classes)"),
    ("complete", True, [], [0, 7], "label y=7"),
    ("score", True, [], [0, 7], "label y=7"),
    ("compress", True, [], [0, 7], "[0, 3)"),  # the prior's own check (class_labels: "y=7")
]


@pytest.mark.parametrize(("command", "conditional", "extra", "y", "needle"), LABEL_CASES)
def test_label_rules_in_every_command(
    tmp_path: Path,
    command: str,
    conditional: bool,
    extra: list[str],
    y: list[int] | None,
    needle: str,
) -> None:
    prior = (
        save_conditional_prior(tmp_path)
        if conditional
        else save_pixel_prior(tmp_path, "gray-mixture")
    )
    npz = write_npz(tmp_path / "x.npz", 2, (5, 4, 1), labels=y)
    before = file_state(prior)
    out = tmp_path / "out"
    assert needle in one_error_line(invoke(*use_args(command, prior, npz, out), *extra))
    assert not out.exists() and file_state(prior) == before


def test_two_level_model_loads_level_by_level(tmp_path: Path) -> None:
    paths = save_two_level(tmp_path)
    models = load_models(paths["top"], bottom_prior_dir=paths["bottom"])  # VAE: the records'
    assert models.model.names == ("top", "bottom") and models.image_shape == (1, 8, 8)
    assert models.prior_paths == (paths["top"], paths["bottom"])
    assert models.prior_hash == f"{content_hash(paths['top'])}+{content_hash(paths['bottom'])}"
    assert models.vae_hash == content_hash(paths["vae"])


def bad_combo(root: Path, case: str) -> tuple[list[str], str]:
    """Model arguments that name priors in the wrong places, or of different VAEs, and the
    words of the one line that refuses them."""
    paths = save_two_level(root)
    top, bottom = str(paths["top"]), str(paths["bottom"])
    if case == "bottom-as-prior":
        return ["--prior", bottom], f"{bottom} models the bottom codes but is given as the top"
    if case == "swapped":
        return ["--prior", bottom, "--bottom-prior", top], "pass the top prior as --prior"
    if case == "top-alone":
        return ["--prior", top], f"{top} is the top prior of a two-level VQ-VAE: pass its bottom"
    if case == "different-vaes":
        other = save_two_level(root / "other", seed=1)
        return ["--prior", top, "--bottom-prior", str(other["bottom"])], "different VAEs"
    one_level, _ = save_two_stage(root)
    if case == "one-level-with-bottom":
        return ["--prior", str(one_level), "--bottom-prior", bottom], "different VAEs"
    assert case == "one-level-prior-two-level-vae"
    return ["--prior", str(one_level), "--vae", str(paths["vae"])], "not the one this prior"


BAD_COMBOS = [
    "bottom-as-prior",
    "swapped",
    "top-alone",
    "different-vaes",
    "one-level-with-bottom",
    "one-level-prior-two-level-vae",
]


@pytest.mark.parametrize("command", ["score", "complete", "compress"])
@pytest.mark.parametrize("case", BAD_COMBOS)
def test_bad_level_combinations_are_one_line(tmp_path: Path, command: str, case: str) -> None:
    args, needle = bad_combo(tmp_path, case)
    npz = write_npz(tmp_path / "x.npz", 2, (8, 8, 1))
    before = file_state(tmp_path)
    out = tmp_path / "out"
    cmd = use_args(command, Path("PRIOR"), npz, out)
    at = cmd.index("--prior")
    line = one_error_line(invoke(*cmd[:at], *args, *cmd[at + 2 :]))
    assert needle in line, line
    assert not out.exists() and file_state(tmp_path) == before
