"""The click command line on configs/tiny through CliRunner: stages, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from vqprior.cli import cli
from vqprior.config import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
DEV = ["--accelerator", "cpu", "--devices", "1"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def last_json(result: Result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_one_line_error(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "vae"
    result = invoke(
        "train-vae", "--config", str(TINY / "vae_mixture.yaml"), "--out", str(out), *DEV
    )
    assert result.exit_code == 0, result.output
    assert last_json(result)["global_step"] == 4
    return out


def test_two_stage_pipeline_through_the_cli(vae_run: Path, tmp_path: Path) -> None:
    codes, prior = tmp_path / "codes", tmp_path / "prior"
    result = invoke("encode", "--vae", str(vae_run), "--out", str(codes))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in codes.iterdir() if p.name != ".lock") == [
        "test.safetensors",
        "train.safetensors",
        "val.safetensors",
    ]
    result = invoke(
        "train-prior", "--config", str(TINY / "prior_codes.yaml"), "--vae", str(vae_run),
        "--codes", str(codes), "--out", str(prior), "--seed", "5", *DEV,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "seed: 5" in (prior / "config.yaml").read_text()
    png = tmp_path / "g.png"
    result = invoke(
        "generate",
        "--prior",
        str(prior),
        "--vae",
        str(vae_run),
        "--num",
        "4",
        "--out",
        str(png),
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert png.is_file() and png.with_suffix(".safetensors").is_file()
    result = invoke("evaluate", "--prior", str(prior), "--device", "cpu")
    assert result.exit_code == 0, result.output
    figures = last_json(result)
    assert figures["bits_per_dim"] == pytest.approx(
        figures["prior_bits_per_dim"] + figures["decoder_bits_per_dim"]
    )
    assert 0 < figures["decoder_bits_per_dim"] < 16
    result = invoke("export", str(prior / "checkpoints" / "last.ckpt"), str(tmp_path / "exp"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    both = invoke("export", str(prior / "checkpoints" / "last.ckpt"), "a", "--out", "b")
    assert both.exit_code == 2 and "once" in both.output


@pytest.mark.parametrize(
    ("override", "named"),
    [("model.chanels=4", "model.chanels"), ("trian.lr=1", "trian"), ("train.lr=abc", "train.lr")],
)
def test_bad_set_override_exits_2_with_one_line(tmp_path: Path, override: str, named: str) -> None:
    cfg = str(TINY / "vae.yaml")
    result = invoke("train-vae", "--config", cfg, "--out", str(tmp_path), "--set", override)
    assert_one_line_error(result, 2, named)


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = invoke(
        "--debug",
        "train-vae",
        "--config",
        str(TINY / "vae.yaml"),
        "--out",
        str(tmp_path),
        "--set",
        "x=1",
    )
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


def test_out_dir_of_another_run_is_refused(vae_run: Path) -> None:
    result = invoke(
        "train-vae",
        "--config",
        str(TINY / "vae_mixture.yaml"),
        "--out",
        str(vae_run),
        "--set",
        "train.lr=0.1",
        *DEV,
    )
    assert_one_line_error(result, 2, "different run", "train.lr")


def test_rerun_of_finished_run_resumes_without_training(vae_run: Path) -> None:
    before = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    result = invoke(
        "train-vae", "--config", str(TINY / "vae_mixture.yaml"), "--out", str(vae_run), *DEV
    )
    assert result.exit_code == 0, result.output
    assert last_json(result)["global_step"] == 4
    after = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_loss_exits_with_one_line_naming_the_step(tmp_path: Path) -> None:
    result = invoke(
        "train-vae",
        "--config",
        str(TINY / "vae.yaml"),
        "--out",
        str(tmp_path),
        "--set",
        "train.lr=1e30",
        *DEV,
    )
    line = assert_one_line_error(result, 1, "non-finite loss", "at step")
    assert str(tmp_path / "nonfinite_batch.pt") in line
    assert torch.load(tmp_path / "nonfinite_batch.pt", weights_only=True)["batch"][0].shape[1:] == (
        1,
        8,
        8,
    )


def test_user_errors_of_the_other_commands(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert_one_line_error(
        invoke("export", str(bad), "--out", str(tmp_path / "m")),
        2,
        "not a vqprior training checkpoint",
    )
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(invoke("export", str(bad), "--out", str(tmp_path / "m")), 2, str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        invoke("generate", "--prior", str(empty), "--out", str(tmp_path / "s.png")),
        2,
        "no exported prior",
    )


def test_import_vqprior_loads_neither_lightning_nor_click() -> None:
    code = "import sys, vqprior, vqprior.train; assert not {'lightning', 'click'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, vqprior.cli; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
