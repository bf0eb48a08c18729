"""vqprior complete: kept pixels / codes unchanged, the grid's size, keep-spec errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    for bad in ("top", "top:x", "box:1,2,3", "middle:2", "box:0,0,9,9"):
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


def test_kept_codes_are_unchanged(tmp_path: Path) -> None:
    prior, vae = save_two_stage(tmp_path)
    models = load_models(prior, vae)
    assert models.vae is not None
    x8 = torch.randint(
        0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    res = complete_images(models, x8, "top:4", samples=2)
    codes = models.vae.encode(uint8_to_float(x8)).repeat_interleave(2, 0)
    assert torch.equal(res.completed[:, :2], codes[:, :2])  # 4 pixel rows = 2 code rows
    assert torch.equal(res.mask[0], code_mask(keep_mask("top:4", 8, 8), 2))


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
