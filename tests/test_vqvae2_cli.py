"""The two-level VQ-VAE through the command line on configs/tiny: train-vae (usage per level),
encode (both maps), train-prior per level, generate (top, then bottom given top) and evaluate
(the two-level bound, recomputed here from the models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner, Result

from vqprior.cli import cli
from vqprior.data import DataConfig, load_image_splits
from vqprior.io import load_pretrained
from vqprior.models.hierarchy import VQVAE2
from vqprior.models.levels import LevelModel

VAE_SETS = ("model.levels=2", "model.recon=mixture", "model.num_mixtures=2")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def last_json(result: Result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two_level")
    dirs = {name: root / name for name in ("vae", "codes", "top", "bottom")}
    vae = invoke("train-vae", "--config", "configs/tiny/vae.yaml", *sets(*VAE_SETS),
                 "--out", str(dirs["vae"]), "--accelerator", "cpu")  # fmt: skip
    summary = last_json(vae)
    for key in ("codes_used_top", "codes_used_bottom", "perplexity_top", "perplexity_bottom"):
        assert f"val/{key}" in summary["metrics"], key
    files = last_json(invoke("encode", "--vae", str(dirs["vae"]), "--out", str(dirs["codes"])))
    assert set(files) == {f"{d}{s}" for d in ("", "top/") for s in ("train", "val", "test")}
    for level in ("top", "bottom"):
        prior = invoke("train-prior", "--config", "configs/tiny/prior_codes.yaml",
                       "--vae", str(dirs["vae"]), "--codes", str(dirs["codes"]),
                       *sets(f"data.level={level}"), "--out", str(dirs[level]),
                       "--accelerator", "cpu")  # fmt: skip
        last_json(prior)
    return dirs


def test_train_vae_and_encode_store_both_levels(runs: dict[str, Path]) -> None:
    vae = load_pretrained(runs["vae"] / "model")
    assert isinstance(vae, VQVAE2)
    assert (runs["vae"] / "images").is_dir()
    split = safetensors.torch.load_file(runs["codes"] / "top" / "train.safetensors")
    bottom = safetensors.torch.load_file(runs["codes"] / "train.safetensors")
    assert split["codes"].shape[1:] == (2, 2) and bottom["codes"].shape[1:] == (4, 4)
    top_cfg = yaml.safe_load((runs["top"] / "config.yaml").read_text())["model"]
    bottom_cfg = yaml.safe_load((runs["bottom"] / "config.yaml").read_text())["model"]
    assert (top_cfg["height"], top_cfg["spatial_cond_channels"]) == (2, 0)
    assert (bottom_cfg["height"], bottom_cfg["spatial_cond_channels"]) == (4, 4)


def test_generate_samples_top_then_bottom_and_decodes(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    png = tmp_path / "s.png"
    args = ["generate", "--prior", str(runs["top"]), "--bottom-prior", str(runs["bottom"])]
    last_json(invoke(*args, "--num", "4", "--out", str(png), "--device", "cpu"))
    tensors = safetensors.torch.load_file(png.with_suffix(".safetensors"))
    assert png.is_file() and tensors["top_codes"].shape == (4, 2, 2)
    vae = load_pretrained(runs["vae"] / "model")
    assert isinstance(vae, VQVAE2)
    images = vae.decode_levels(tensors["top_codes"], tensors["bottom_codes"])
    assert torch.equal(((images + 1) * 127.5).round().to(torch.uint8), tensors["images"])


def test_evaluate_reports_the_two_level_bound(runs: dict[str, Path]) -> None:
    args = ["evaluate", "--prior", str(runs["top"]), "--bottom-prior", str(runs["bottom"])]
    result = last_json(invoke(*args, "--device", "cpu"))
    parts = ("top_bits_per_dim", "bottom_bits_per_dim", "decoder_bits_per_dim")
    assert result["bits_per_dim"] == pytest.approx(sum(result[k] for k in parts))
    assert (runs["bottom"] / "eval_test.json").is_file()
    # recompute from the exported models and the test split
    vae, top, bottom = (load_pretrained(runs[k] / "model") for k in ("vae", "top", "bottom"))
    data = yaml.safe_load((runs["bottom"] / "config.yaml").read_text())["data"]
    splits = load_image_splits(DataConfig.from_dict({**data, "level": None}))
    n = len(splits.test)  # type: ignore[arg-type]
    x = torch.stack([splits.test[i][0] for i in range(n)])
    y = torch.tensor([int(splits.test[i][1]) for i in range(n)])
    nats = LevelModel(vae, [top, bottom]).nats(x, y)  # type: ignore[arg-type,list-item]
    dims = x[0].numel()
    assert result["top_bits_per_dim"] == pytest.approx(
        float(nats.levels[0].mean()) / (dims * math.log(2)), rel=1e-4
    )
    assert result["bits_per_dim"] == pytest.approx(
        nats.bits_per_dim(dims, ("top", "bottom"))["bits_per_dim"], rel=1e-4
    )


def test_level_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    for args, needle in [
        (["generate", "--prior", str(runs["bottom"]), "--out", str(tmp_path / "a.png")],
         "--bottom-prior"),
        (["generate", "--prior", str(runs["bottom"]), "--bottom-prior", str(runs["top"]),
          "--out", str(tmp_path / "b.png")], "is given as the top prior"),
        (["generate", "--prior", str(runs["top"]), "--out", str(tmp_path / "c.png")],
         "pass its bottom prior as --bottom-prior"),
        (["train-prior", "--config", "configs/tiny/prior_codes.yaml", "--vae", str(runs["vae"]),
          "--out", str(tmp_path / "p")], "data.level=top or data.level=bottom"),
        (["train-vae", "--config", "configs/tiny/vae.yaml", *sets("data.level=top"),
          "--out", str(tmp_path / "v")], "data.level belongs to train-prior"),
    ]:  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], result.output


def test_pipeline_prepare_step_encodes_both_levels(runs: dict[str, Path], tmp_path: Path) -> None:
    """The prepare step (run once before the ranks of a DDP stage) writes a two-level prior's
    run dir as train-prior would: vae.json and every level's codes in <out>/codes, which the
    stage then finds valid (the codes of --codes, encoded by `vqprior encode`, are the same)."""
    from vqprior.pipeline.run import _prepare
    from vqprior.train.config import DeviceOptions

    cfg = yaml.safe_load(Path("configs/tiny/prior_codes.yaml").read_text())
    cfg = {**cfg, "vae": str(runs["vae"]), "data": {**cfg["data"], "level": "bottom"}}
    out = tmp_path / "prior"
    call = {"kind": "train-prior", "cfg": cfg, "out": str(out), "codes_dir": None}
    _prepare(call, DeviceOptions(accelerator="cpu", devices="1", progress=False))
    assert json.loads((out / "vae.json").read_text())["level"] == "bottom"
    for sub in ("top", ""):
        mine = safetensors.torch.load_file(out / "codes" / sub / "train.safetensors")
        encoded = safetensors.torch.load_file(runs["codes"] / sub / "train.safetensors")
        assert torch.equal(mine["codes"], encoded["codes"])
