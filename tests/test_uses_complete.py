"""vqprior complete: kept pixels / codes unchanged (every level of a one- or two-level VAE),
nothing of the removed region reaches the model, the grid's size, keep-spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_uses_common import (
    LEVELS,
    file_state,
    invoke,
    load_levels,
    model_args,
    one_error_line,
    save_levels,
    save_pixel_prior,
    single_thread,  # noqa: F401 (autouse fixture)
    write_npz,
)

from vqprior.data import float_to_uint8, uint8_to_float
from vqprior.uses.complete import code_mask, complete_images, keep_mask
from vqprior.uses.models import load_models


def test_keep_specs() -> None:
    assert keep_mask("top:2", 4, 3).sum() == 6 and keep_mask("top:2", 4, 3)[:2].all()
    assert keep_mask("left:1", 4, 3)[:, 0].all() and keep_mask("left:1", 4, 3).sum() == 4
    box = keep_mask("box:1,1,3,2", 4, 3)
    assert not box[1:3, 1:2].any() and box.sum() == 12 - 2
    assert torch.equal(
        code_mask(keep_mask("top:3", 4, 4), 2), torch.tensor([[True, True], [False, False]])
    )
    assert keep_mask("top:3", 4, 3).sum() == 9 and keep_mask("left:2", 4, 3).sum() == 8
    for bad in ("top", "top:x", "box:1,2,3", "middle:2", "box:0,0,9,9", "top:0", "top:4"):
        with pytest.raises(ValueError, match="--keep"):
            keep_mask(bad, 4, 3)
    for bad in ("left:0", "left:3", "top:-1", "box:0,0,4,3", "box:1,1,1,2"):
        with pytest.raises(ValueError, match="--keep"):
            keep_mask(bad, 4, 3)


@pytest.mark.parametrize("case", ["rgb-mixture", "rgb-categorical"])
def test_kept_pixels_are_unchanged(tmp_path: Path, case: str) -> None:
    models = load_models(save_pixel_prior(tmp_path, case))
    x8 = torch.randint(
        0, 256, (2, 3, 5, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    for keep in ("top:2", "box:1,1,4,3"):
        res = complete_images(models, x8, keep, samples=3, seed=1)
        m = keep_mask(keep, 5, 4)
        assert res.samples.shape == (2, 3, 3, 5, 4)
        assert torch.equal(res.samples[..., m], x8[:, None].expand_as(res.samples)[..., m])
        assert not torch.equal(res.samples[:, 0], res.samples[:, 1])  # different completions
        assert (res.masked[..., ~m] == 128).all()


KEPT_CODES = [  # (levels, spec, kept codes per level, top first: rows x columns kept)
    (1, "top:4", [(2, 4)]),
    (2, "top:4", [(1, 2), (2, 4)]),  # a top code covers 4x4 pixels, a bottom code 2x2
    (2, "top:2", [(0, 2), (1, 4)]),  # no whole top code: the top level is all sampled
    (2, "left:6", [(2, 1), (4, 3)]),
]


@pytest.mark.parametrize(("levels", "keep", "kept"), KEPT_CODES)
def test_kept_codes_are_unchanged(
    tmp_path: Path, levels: int, keep: str, kept: list[tuple[int, int]]
) -> None:
    models = load_levels(save_levels(tmp_path, levels))
    model = models.model
    x8 = torch.randint(
        0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    res = complete_images(models, x8, keep, samples=2)
    masked = torch.where(keep_mask(keep, 8, 8), x8, 128)  # what the encoder sees
    assert torch.equal(res.masked, masked)
    codes = model.encode(uint8_to_float(masked))  # every level, top first
    assert len(res.known) == len(res.mask) == len(res.completed) == levels
    for level, known, mask, done, (rows, cols) in zip(
        codes, res.known, res.mask, res.completed, kept, strict=True
    ):
        f = 8 // level.shape[-1]
        assert torch.equal(mask[0], code_mask(keep_mask(keep, 8, 8), f))
        assert int(mask[0].sum()) == rows * cols and torch.equal(known, level)
        want = level.repeat_interleave(2, 0)
        assert torch.equal(done[:, mask[0]], want[:, mask[0]])
    assert torch.equal(
        res.samples.flatten(0, 1), float_to_uint8(model.decode(list(res.completed)))
    )  # the completions are the completed levels, decoded


def differ_in(x8: torch.Tensor, removed: torch.Tensor, seed: int) -> torch.Tensor:
    """``x8`` with new random values where ``removed`` (bool [H, W]) is True."""
    gen = torch.Generator().manual_seed(seed)
    other = torch.randint(0, 256, x8.shape, generator=gen, dtype=torch.uint8)
    assert (other != x8)[..., removed].any()
    return torch.where(removed, other, x8)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("keep", ["box:2,2,6,6", "top:4", "left:6"])
def test_removed_region_does_not_reach_the_codes_priors(
    tmp_path: Path, keep: str, levels: int
) -> None:
    models = load_levels(save_levels(tmp_path, levels))
    x8 = torch.randint(
        0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    removed = ~keep_mask(keep, 8, 8)
    y8 = differ_in(x8, removed, seed=1)
    a = complete_images(models, x8, keep, samples=2, seed=5)
    b = complete_images(models, y8, keep, samples=2, seed=5)
    assert any(m.any() for m in a.mask) and not any(m.all() for m in a.mask)
    for i in range(levels):  # the kept codes the sampler gets, level by level
        assert torch.equal(a.mask[i], b.mask[i])
        assert torch.equal(a.known[i][a.mask[i]], b.known[i][b.mask[i]])
        assert torch.equal(a.completed[i], b.completed[i])
    assert torch.equal(a.samples, b.samples)
    if keep == "box:2,2,6,6":  # the full-image encoding does leak: what masking prevents
        full = models.model.encode(uint8_to_float(torch.cat([x8, y8])))
        assert any((c[:3] != c[3:])[m].any() for c, m in zip(full, a.mask, strict=True))


def test_removed_region_does_not_reach_the_pixel_prior(tmp_path: Path) -> None:
    models = load_models(save_pixel_prior(tmp_path, "rgb-mixture"))
    x8 = torch.randint(
        0, 256, (2, 3, 5, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    keep = "box:1,1,4,3"
    y8 = differ_in(x8, ~keep_mask(keep, 5, 4), seed=1)
    a = complete_images(models, x8, keep, samples=2, seed=5)
    b = complete_images(models, y8, keep, samples=2, seed=5)
    assert torch.equal(a.known[0], b.known[0]) and torch.equal(a.samples, b.samples)


def test_cli_writes_the_grid(tmp_path: Path) -> None:
    prior = save_pixel_prior(tmp_path, "gray-mixture")
    npz = write_npz(tmp_path / "x.npz", 3, (5, 4, 1))
    out = tmp_path / "grid.png"
    args = ["complete", "--prior", str(prior), "--images", str(npz), "--out", str(out)]
    result = invoke(*args, "--keep", "left:2", "--samples", "2")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:  # 3 rows of (original, masked, 2 samples), 2-pixel padding
        width, height = im.size
    scale = ((width - 2) // 4 - 2) // 4  # the grid may upscale small images by an integer
    assert scale >= 1 and (width, height) == (4 * (4 * scale + 2) + 2, 3 * (5 * scale + 2) + 2)
    assert "--keep" in one_error_line(invoke(*args, "--keep", "bottom:2"))


BAD_KEEPS = [  # (prior, spec, needle): the gray pixel prior is 5x4, the codes prior 8x8 by 2x2
    ("pixels", "top:0", "--keep top:0: N must lie in [1, 4] for a 5x4 image"),
    ("pixels", "top:5", "--keep top:5: N must lie in [1, 4]"),
    ("pixels", "top:99", "--keep top:99: N must lie in [1, 4]"),
    ("pixels", "left:0", "--keep left:0: N must lie in [1, 3]"),
    ("pixels", "left:4", "--keep left:4: N must lie in [1, 3]"),
    ("pixels", "box:0,0,5,4", "removes the whole 5x4 image"),
    ("pixels", "box:0,0,6,4", "the box must lie inside the 5x4 image"),
    ("pixels", "box:2,2,2,3", "the box must lie inside the 5x4 image"),
    ("codes", "top:1", "--keep top:1 keeps no whole code"),
    ("codes", "box:0,1,8,8", "--keep box:0,1,8,8 keeps no whole code"),
    ("two-level", "top:1", "--keep top:1 keeps no whole code of this codes prior (a code "
     "covers 2x2 pixels)"),
    ("two-level", "left:1", "--keep left:1 keeps no whole code"),
]  # fmt: skip


@pytest.mark.parametrize("levels", LEVELS)
def test_cli_completes_through_every_level(tmp_path: Path, levels: int) -> None:
    paths = save_levels(tmp_path, levels)
    npz = write_npz(tmp_path / "x.npz", 2, (8, 8, 1))
    out = tmp_path / "grid.png"
    result = invoke(
        "complete", *model_args(paths, vae=False), "--images", str(npz), "--out", str(out),
        "--keep", "top:4", "--samples", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    kept = {"codes": 8} if levels == 1 else {"top": 2, "bottom": 8}  # top 4 of 8 pixel rows
    assert report["levels"] == list(kept) and report["kept_elements"] == kept
    with Image.open(out) as im:
        assert im.size[0] > 4 * 8  # original, masked, 2 completions


@pytest.mark.parametrize(("kind", "spec", "needle"), BAD_KEEPS)
def test_bad_keep_is_one_line_and_writes_nothing(
    tmp_path: Path, kind: str, spec: str, needle: str
) -> None:
    if kind == "pixels":
        args, shape = ["--prior", str(save_pixel_prior(tmp_path, "gray-mixture"))], (5, 4, 1)
    else:
        args, shape = model_args(save_levels(tmp_path, 1 if kind == "codes" else 2)), (8, 8, 1)
    npz = write_npz(tmp_path / "x.npz", 2, shape)
    before = file_state(tmp_path)
    out = tmp_path / "grid.png"
    result = invoke("complete", *args, "--images", str(npz), "--out", str(out), "--keep", spec)
    assert needle in one_error_line(result)
    assert not out.exists() and file_state(tmp_path) == before


@pytest.mark.parametrize(("option", "value"), [("--samples", "0"), ("--limit", "0")])
def test_bad_counts_are_one_line(tmp_path: Path, option: str, value: str) -> None:
    prior = save_pixel_prior(tmp_path, "gray-mixture")
    npz = write_npz(tmp_path / "x.npz", 2, (5, 4, 1))
    out = tmp_path / "grid.png"
    args = ["--prior", str(prior), "--images", str(npz), "--out", str(out), "--keep", "top:2"]
    result = invoke("complete", *args, option, value)
    assert f"{option} {value} must be >= 1" in one_error_line(result) and not out.exists()
