"""vqprior score: CSV bits/dim against the model's log_prob (level by level, for one and two
levels), heatmaps per level, the class mixture over levels, one-line errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from test_uses_common import (
    LEVELS,
    file_state,
    invoke,
    load_levels,
    model_args,
    one_error_line,
    save_conditional_prior,
    save_levels,
    save_pixel_prior,
    save_two_level,
    single_thread,  # noqa: F401 (autouse fixture)
    write_npz,
)

from vqprior.data import uint8_to_float
from vqprior.nn.mixture import mixture_log_prob
from vqprior.uses.images import fit_images, png_bytes, read_images
from vqprior.uses.models import load_models
from vqprior.uses.score import element_log_probs

LN2 = math.log(2)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("case", ["gray-mixture", "rgb-categorical"])
def test_csv_bits_per_dim_is_minus_log_prob(tmp_path: Path, case: str) -> None:
    prior_dir = save_pixel_prior(tmp_path, case)
    channels = 1 if case.startswith("gray") else 3
    npz = write_npz(tmp_path / "x.npz", 5, (5, 4, channels))
    result = invoke(
        "score", "--prior", str(prior_dir), "--images", str(npz), "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "o" / "scores.csv")
    models = load_models(prior_dir)
    x = rearrange(torch.from_numpy(np.load(npz)["x"]), "n h w c -> n c h w")
    want = -models.prior.log_prob(uint8_to_float(x)).double() / (math.log(2) * x[0].numel())
    got = torch.tensor([float(r["bits_per_dim"]) for r in rows], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5)
    for r, img in zip(rows, x, strict=True):
        png = 8 * len(png_bytes(img)) / img.numel()
        assert float(r["png_bits_per_dim"]) == pytest.approx(png, abs=1e-5)
        assert float(r["complexity_corrected"]) == pytest.approx(
            float(r["bits_per_dim"]) - png, abs=1e-5
        )
    maps = sorted((tmp_path / "o" / "heatmaps").iterdir())
    assert [m.stem for m in maps] == [r["name"] for r in rows]
    with Image.open(maps[0]) as im:
        assert im.size == (4, 5)  # (width, height) of the image


@pytest.mark.parametrize("levels", LEVELS)
def test_csv_is_minus_log_prob_per_level_and_heatmaps_per_level(
    tmp_path: Path, levels: int
) -> None:
    paths = save_levels(tmp_path, levels)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("one.png", "two.png"):  # RGB 10x12 files: converted to gray, resized to 8x8
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "o"
    result = invoke(
        "score", *model_args(paths, vae=False), "--images", str(folder), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "scores.csv")
    assert [r["name"] for r in rows] == ["one.png", "two.png"]
    model = load_levels(paths).model
    assert model.vae is not None and len(model.priors) == levels
    columns = ["prior_bits"] if levels == 1 else ["top_bits", "bottom_bits"]
    assert list(rows[0]) == [
        "name", "bits_per_dim", "png_bits_per_dim", "complexity_corrected", *columns,
        "decoder_bits", "total_bits",
    ]  # fmt: skip
    x = uint8_to_float(fit_images(read_images(folder), 1, 8, 8))
    with torch.no_grad():  # recomputed level by level: each given the levels above
        codes = model.encode(x)
        level_bits = [-lp.double() / LN2 for lp in model.level_log_probs(codes)]
        params = model.vae.decoder_output(*codes)
        dec_bits = -mixture_log_prob(x, params, 2).flatten(1).sum(1).double() / LN2
    total = torch.stack(level_bits).sum(0) + dec_bits
    for i, r in enumerate(rows):
        for col, bits in zip(columns, level_bits, strict=True):
            assert float(r[col]) == pytest.approx(float(bits[i]), abs=2e-3)
        assert float(r["decoder_bits"]) == pytest.approx(float(dec_bits[i]), abs=2e-3)
        assert float(r["total_bits"]) == pytest.approx(float(total[i]), abs=4e-3)
        assert float(r["bits_per_dim"]) == pytest.approx(float(total[i]) / 64, abs=1e-5)
    for name, level in zip(model.names, codes, strict=True):  # a heatmap per level
        folder = out / "heatmaps" if levels == 1 else out / "heatmaps" / name
        with Image.open(folder / "one.png") as im:
            assert im.size == (8, 8)
            heat = np.asarray(im)
        f = 8 // level.shape[-1]  # one colour per code: f x f pixels
        blocks = rearrange(heat, "(h fh) (w fw) c -> h w (fh fw) c", fh=f, fw=f)
        assert (blocks == blocks[:, :, :1]).all()


def test_two_level_class_mixture_is_the_marginal(tmp_path: Path) -> None:
    """An unlabelled conditional model scores log (1/k) sum_y p(top | y) p(bottom | top, y),
    spread over both levels' elements; labels give each class's own log p."""
    paths = save_two_level(tmp_path, classes=3)
    model = load_models(paths["top"], bottom_prior_dir=paths["bottom"]).model
    x = uint8_to_float(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    with torch.no_grad():
        codes = model.encode(x)
        lps = element_log_probs(model, codes, None)
        per_class = torch.stack(
            [
                torch.stack(model.level_log_probs(codes, torch.full((4,), y))).sum(0)
                for y in range(3)
            ]
        )  # [k, b]
        labelled = element_log_probs(model, codes, torch.tensor([0, 1, 2, 0]))
    assert [lp.shape for lp in lps] == [c.shape for c in codes]
    got = torch.stack([lp.flatten(1).sum(1) for lp in lps]).sum(0)
    assert torch.allclose(got, torch.logsumexp(per_class, 0) - math.log(3), atol=1e-4)
    got = torch.stack([lp.flatten(1).sum(1) for lp in labelled]).sum(0)
    assert torch.allclose(got, per_class[[0, 1, 2, 0], torch.arange(4)], atol=1e-4)


def test_bad_path_and_wrong_channels_are_one_line(tmp_path: Path) -> None:
    prior_dir = save_pixel_prior(tmp_path, "rgb-mixture")
    result = invoke("score", "--prior", str(prior_dir), "--images", str(tmp_path / "missing.npz"))
    assert "missing.npz not found" in one_error_line(result)
    npz = write_npz(tmp_path / "two.npz", 2, (5, 4, 2))
    result = invoke(
        "score", "--prior", str(prior_dir), "--images", str(npz), "--out", str(tmp_path / "o")
    )
    assert "2 channels and cannot be converted" in one_error_line(result)
    result = invoke("score", "--prior", str(tmp_path / "nodir"), "--images", str(npz))
    assert "not found" in one_error_line(result)


def test_npz_labels_condition_a_conditional_prior_only(tmp_path: Path) -> None:
    cond, plain = save_conditional_prior(tmp_path), save_pixel_prior(tmp_path, "gray-mixture")
    npz = write_npz(tmp_path / "x.npz", 2, (5, 4, 1), labels=[0, 2])
    x = uint8_to_float(rearrange(torch.from_numpy(np.load(npz)["x"]), "n h w c -> n c h w"))
    for prior, y in ((cond, torch.tensor([0, 2])), (plain, None)):  # plain: y ignored
        out = tmp_path / prior.name
        result = invoke("score", "--prior", str(prior), "--images", str(npz), "--out", str(out))
        assert result.exit_code == 0, result.output
        got = torch.tensor([float(r["bits_per_dim"]) for r in read_csv(out / "scores.csv")])
        with torch.no_grad():
            want = -load_models(prior).prior.log_prob(x, cond=y) / (math.log(2) * 20)
        assert torch.allclose(got, want.float(), atol=1e-5)


def test_bad_batch_size_is_one_line(tmp_path: Path) -> None:
    prior = save_pixel_prior(tmp_path, "gray-mixture")
    npz = write_npz(tmp_path / "x.npz", 2, (5, 4, 1))
    before, out = file_state(tmp_path), tmp_path / "o"
    result = invoke(
        "score", "--prior", str(prior), "--images", str(npz), "--out", str(out),
        "--batch-size", "0",
    )  # fmt: skip
    assert "--batch-size 0 must be >= 1" in one_error_line(result)
    assert not out.exists() and file_state(tmp_path) == before
