"""Bad input on the command line: one ``error: ...`` line, a non-zero exit, no traceback, and
nothing in an existing run directory lost or half-written.

Every test runs with two finished runs (a tiny VAE and a codes prior on it) whose files are
hashed before and after the test (autouse fixture ``runs_untouched``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from PIL import Image

from vqprior.cli import cli
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.train.vae import VQVAEModule

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
DEV = ["--accelerator", "cpu", "--devices", "1"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_error(result: Result, code: int, *needles: str) -> str:
    """Exit ``code``; stderr is one line ``error: ...`` holding every needle; no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    progress = "INFO vqprior.train.progress: "  # plain progress lines (no terminal attached)
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under ``dirs``."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("err") / "vae"
    result = invoke("train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out), *DEV)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def prior_run(vae_run: Path) -> Path:
    out = vae_run.parent / "prior"
    result = invoke(
        "train-prior", "--config", str(TINY / "prior_codes.yaml"), "--vae", str(vae_run),
        "--out", str(out), *DEV,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(autouse=True)
def runs_untouched(vae_run: Path, prior_run: Path) -> Any:
    before = snapshot(vae_run, prior_run)
    yield
    assert snapshot(vae_run, prior_run) == before


def exported_vae(where: Path, **overrides: Any) -> Path:
    """A run-dir-shaped VAE export (untrained) with the tiny architecture and ``overrides``."""
    base = {"in_channels": 1, "hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1,
            "downsample": 2, "num_codes": 16, "code_dim": 4}  # fmt: skip
    VQVAE(VQVAEConfig(**{**base, **overrides})).save_pretrained(where / "model")
    return where


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# ---- files ------------------------------------------------------------------------------


def test_missing_config_file(vae_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_error(
        invoke("train-vae", "--config", str(missing), "--out", str(vae_run), *DEV),
        2, "config file", str(missing), "not found",
    )  # fmt: skip
    assert_error(
        invoke("train-vae", "--config", str(tmp_path), "--out", str(tmp_path / "o"), *DEV),
        2, "is a directory",
    )  # fmt: skip


def test_missing_data_file_or_folder(tmp_path: Path) -> None:
    cfg = ["--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o"), *DEV]
    npz = tmp_path / "none.npz"
    result = invoke("train-vae", *cfg, "--set", "data.name=npz", "--set", f"data.path={npz}")
    assert_error(result, 2, str(npz), "not found")
    folder = tmp_path / "no_images"
    result = invoke("train-vae", *cfg, "--set", "data.name=folder", "--set", f"data.path={folder}")
    assert_error(result, 2, str(folder), "not found")
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_unreadable_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "vae.yaml"
    shutil.copy(TINY / "vae.yaml", cfg)
    read_text = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == cfg:  # as chmod 000 would (the tests may run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    out = ["--out", str(tmp_path / "o"), *DEV]
    assert_error(invoke("train-vae", "--config", str(cfg), *out), 2, str(cfg), "Permission denied")
    monkeypatch.undo()
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert_error(invoke("train-vae", "--config", str(cfg), *out), 2, "cannot read config", str(cfg))
    cfg.write_text("model: [unclosed\n")
    assert_error(invoke("train-vae", "--config", str(cfg), *out), 2, "not valid YAML", str(cfg))


def image_folder(root: Path, n: int, corrupt: str) -> Path:
    """``n`` 8x8 grey PNGs in ``root`` and one truncated after its header, named ``corrupt``."""
    root.mkdir()
    gen = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(gen.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    whole = (root / "img00.png").read_bytes()
    (root / corrupt).write_bytes(whole[: len(whole) // 2])
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_met_during_training(tmp_path: Path, workers: int) -> None:
    """Every training batch holds every image; a worker's error still shows its own message."""
    folder = image_folder(tmp_path / "imgs", 15, corrupt="zz_bad.png")
    sets = [f"data.path={folder}", "data.name=folder", "data.val_fraction=0",
            "data.test_fraction=0", "data.limit=null", f"train.num_workers={workers}"]  # fmt: skip
    result = invoke(
        "train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o"), *DEV,
        *[a for s in sets for a in ("--set", s)],
    )  # fmt: skip
    assert_error(result, 2, "cannot read image", str(folder / "zz_bad.png"))
    assert not (tmp_path / "o" / "model").exists()


def test_corrupt_first_image_is_met_before_training(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", 4, corrupt="aa_bad.png")
    result = invoke(
        "train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o"), *DEV,
        "--set", "data.name=folder", "--set", f"data.path={folder}", "--set", "data.limit=null",
    )  # fmt: skip
    assert_error(result, 2, "cannot read image", str(folder / "aa_bad.png"))


# ---- checkpoints and exported models ----------------------------------------------------


def test_truncated_or_garbage_checkpoint_for_export(vae_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    data = (vae_run / "checkpoints" / "last.ckpt").read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    out = tmp_path / "exported"
    assert_error(
        invoke("export", str(ckpt), "--out", str(out)), 2, str(ckpt), "corrupt or truncated"
    )
    ckpt.write_bytes(os.urandom(300))
    assert_error(invoke("export", str(ckpt), "--out", str(out)), 2, str(ckpt))
    assert not out.exists()
    assert_error(invoke("export", str(tmp_path / "none.ckpt"), "--out", str(out)), 2, "not found")


def test_corrupt_model_dir_for_generate(prior_run: Path, vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(prior_run, tmp_path)
    weights, config = run / "model" / "model.safetensors", run / "model" / "config.json"
    png = tmp_path / "s.png"
    args = ["generate", "--prior", str(run), "--vae", str(vae_run), "--out", str(png)]
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert_error(invoke(*args), 2, str(weights), "corrupt or truncated")
    weights.write_bytes(good)
    meta = json.loads(config.read_text())
    config.write_text("{not json")
    assert_error(invoke(*args), 2, str(config), "corrupt")
    meta["config"]["channels"] = 16  # weights of an 8-channel model under a 16-channel config
    config.write_text(json.dumps(meta))
    assert_error(invoke(*args), 2, "weights do not match the config", "size mismatch")
    meta["config"]["chanels"] = meta["config"].pop("channels")
    config.write_text(json.dumps(meta))
    assert_error(invoke(*args), 2, str(config), "chanels")
    assert not png.exists()


def test_prior_and_vae_that_do_not_match(prior_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    fewer_codes = exported_vae(tmp_path / "vae8", num_codes=8)
    result = invoke(
        "generate", "--prior", str(prior_run), "--vae", str(fewer_codes), "--out", str(png)
    )
    assert_error(result, 2, "8 codes", "prior models 16")
    coarser = exported_vae(tmp_path / "vae_ds4", downsample=4)
    result = invoke("generate", "--prior", str(prior_run), "--vae", str(coarser), "--out", str(png))
    assert_error(result, 2, "code maps", "(4, 4)")
    same_shape = exported_vae(tmp_path / "vae_other")
    result = invoke(
        "generate", "--prior", str(prior_run), "--vae", str(same_shape), "--out", str(png)
    )
    assert_error(result, 2, "not the one this prior was trained on")
    assert not png.exists()


# ---- shapes -----------------------------------------------------------------------------


def test_vae_for_other_channels_than_the_data(tmp_path: Path) -> None:
    rgb = exported_vae(tmp_path / "vae_rgb", in_channels=3)
    result = invoke(
        "train-prior", "--config", str(TINY / "prior_codes.yaml"), "--vae", str(rgb),
        "--out", str(tmp_path / "o"), *DEV,
    )  # fmt: skip
    assert_error(result, 2, "3-channel", "has 1")
    assert not (tmp_path / "o").exists()


def test_evaluate_with_data_of_the_wrong_shape(
    prior_run: Path, vae_run: Path, tmp_path: Path
) -> None:
    run = copy_run(prior_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["image_size"] = 16  # 16x16 images -> 8x8 code maps; the prior models 4x4
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("evaluate", "--prior", str(run), "--vae", str(vae_run), "--split", "val")
    assert_error(result, 2, "does not fit this prior", "(4, 4)")


def test_image_size_the_vae_cannot_take(tmp_path: Path) -> None:
    result = invoke(
        "train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o"), *DEV,
        "--set", "data.image_size=6", "--set", "model.downsample=4",
    )  # fmt: skip
    assert_error(result, 2, "6x6", "downsample=4")
    assert not (tmp_path / "o").exists()


# ---- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=abc", "train.lr"),
        ("model.chanels=3", "model.chanels"),
        ("trian.lr=1", "trian"),
        ("model.num_codes=1.5", "num_codes"),
        ("data.limit=many", "limit"),
        ("train.max_steps=-1", "max_steps"),
        ("nokey", "key=value"),
    ],
)
def test_unknown_keys_and_wrong_types(
    vae_run: Path, tmp_path: Path, override: str, needle: str
) -> None:
    for out in (vae_run, tmp_path / "fresh"):
        result = invoke(
            "train-vae",
            "--config",
            str(TINY / "vae.yaml"),
            "--out",
            str(out),
            "--set",
            override,
            *DEV,
        )
        assert_error(result, 2, needle)
    assert not (tmp_path / "fresh").exists()


def test_output_dir_that_holds_something_else(
    vae_run: Path, prior_run: Path, tmp_path: Path
) -> None:
    vae_cfg = ["--config", str(TINY / "vae.yaml"), *DEV]
    result = invoke("train-vae", *vae_cfg, "--out", str(vae_run), "--set", "train.lr=0.1")
    assert_error(result, 2, "different run", "train.lr")
    result = invoke("train-vae", *vae_cfg, "--out", str(prior_run))
    assert_error(result, 2, "different run")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert_error(invoke("train-vae", *vae_cfg, "--out", str(other)), 2, "not empty", "thesis.tex")
    assert sorted(p.name for p in other.iterdir()) == ["thesis.tex"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_error(invoke("train-vae", *vae_cfg, "--out", str(a_file)), 2, "is a file")
    assert_error(
        invoke("export", str(vae_run / "checkpoints" / "last.ckpt"), "--out", str(other)),
        2, "holds other files",
    )  # fmt: skip


def test_unreadable_run_config(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path)
    (run / "config.yaml").write_text("model: [\n")
    before = snapshot(run)
    result = invoke("train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(run), *DEV)
    assert_error(result, 2, str(run / "config.yaml"))
    assert snapshot(run) == before


# ---- data sources and training failures -------------------------------------------------


def test_dataset_absent_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr("urllib.request.urlopen", offline)  # belt and braces: no network
    root = tmp_path / "no_such_root"
    started = time.time()
    result = invoke(
        "train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o"), *DEV,
        "--set", "data.name=mnist", "--set", f"data.root={root}", "--set", "data.download=true",
    )  # fmt: skip
    assert time.time() - started < 20
    assert_error(result, 2, "MNIST not found", "download failed")


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = VQVAEModule._step

    def poisoned(self: VQVAEModule, batch: Any, stage: str) -> torch.Tensor:
        loss = step(self, batch, stage)
        return loss * float("nan") if stage == "train" and self.global_step >= 3 else loss

    monkeypatch.setattr(VQVAEModule, "_step", poisoned)
    out = tmp_path / "o"
    result = invoke("train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out), *DEV)
    line = assert_error(result, 1, "non-finite loss", "at step 3", str(out / "nonfinite_batch.pt"))
    assert "last good checkpoint" in line
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    bad = torch.load(out / "nonfinite_batch.pt", weights_only=True)
    assert bad["step"] == 3 and bad["batch"][0].shape == (16, 1, 8, 8)
    assert not (out / "model").exists()
    assert (out / "metrics.csv").is_file()  # the logs up to the bad step are kept


def test_a_real_process_prints_exactly_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run(
        [sys.executable, "-c", "from vqprior.cli import main; main()", "train-vae",
         "--config", str(missing), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr == f"error: config file {missing} not found\n"


def test_an_unexpected_failure_is_one_line_pointing_to_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("kernel exploded\nwith details on further lines")

    monkeypatch.setattr("vqprior.train.stages.train_vae", broken)
    args = ["train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(tmp_path / "o")]
    line = assert_error(invoke(*args), 1, "kernel exploded", "RuntimeError", "--debug")
    assert "further lines" not in line
    result = invoke("--debug", *args)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
