"""generate --top-k / --top-p / --guidance (options forwarded to PixelCNN.sample)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from test_uses_common import (
    invoke,
    one_error_line,
    save_pixel_prior,
    single_thread,  # noqa: F401 (autouse fixture)
)


def test_top_k_one_is_the_mode_whatever_the_seed(tmp_path: Path) -> None:
    prior = save_pixel_prior(tmp_path, "rgb-categorical", 3, 3)
    images = []
    for seed in ("1", "2"):
        out = tmp_path / f"s{seed}.png"
        args = ["generate", "--prior", str(prior), "--num", "3", "--out", str(out), "--seed", seed]
        result = invoke(*args, "--top-k", "1")
        assert result.exit_code == 0, result.output
        images.append(load_file(out.with_suffix(".safetensors"))["images"])
    assert (images[0] == images[1]).all()
    result = invoke(*args, "--top-p", "0.5", "--out", str(tmp_path / "p.png"))
    assert result.exit_code == 0, result.output


def test_guidance_without_a_null_class_is_one_line(tmp_path: Path) -> None:
    categorical = save_pixel_prior(tmp_path, "rgb-categorical", 3, 3)
    args = ["generate", "--prior", str(categorical), "--num", "2", "--out", str(tmp_path / "g.png")]
    assert "guidance" in one_error_line(invoke(*args, "--guidance", "1.0"))
