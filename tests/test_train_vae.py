"""train_vae on configs/tiny: run-dir artefacts, resume, the non-finite guard, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torchvision
import yaml

from vqprior.artifacts import upscale
from vqprior.config import ConfigError
from vqprior.data import DataConfig, float_to_uint8, load_image_splits
from vqprior.io import content_hash, load_pretrained
from vqprior.models.vqvae import VQVAE
from vqprior.train.config import DeviceOptions
from vqprior.train.inference import export
from vqprior.train.stages import train_vae

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CPU = DeviceOptions(accelerator="cpu", devices="1", progress=False)


def tiny(name: str = "vae.yaml") -> dict[str, Any]:
    return yaml.safe_load((TINY / name).read_text())


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("vae")
    return out, train_vae(tiny(), out, CPU)


def test_run_dir_holds_every_artefact(run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = run
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["in_channels"] == 1  # filled in from the digits
    assert resolved["train"]["max_steps"] == 6
    assert (
        summary["global_step"] == 6 == json.loads((out / "summary.json").read_text())["global_step"]
    )
    assert {"val/loss", "val/recon_mse", "val/codes_used", "train/loss"} <= set(summary["metrics"])
    assert 1 <= summary["metrics"]["val/codes_used"] <= 16
    rows = read_rows(out / "metrics.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and len(steps) >= 5  # one row per step
    assert all(r["train/loss"] for r in rows[:5])
    assert any(r.get("val/loss") for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == [
        "best.ckpt",
        "last.ckpt",
        "step=0000002.ckpt",
        "step=0000004.ckpt",
        "step=0000006.ckpt",
    ]


def exported_ckpt(out: Path, summary: dict[str, Any]) -> Path:
    """The checkpoint whose weights the run exported: best.ckpt or last.ckpt."""
    return out / "checkpoints" / ("best.ckpt" if summary["exported"] == "best" else "last.ckpt")


def test_checkpoint_loads_with_weights_only_and_matches_export(
    run: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["kind"] == "vae"
    assert ckpt["optimizer_states"][0]["state"]  # full training state, not weights only
    model = load_pretrained(out / "model")
    assert isinstance(model, VQVAE)
    chosen = torch.load(exported_ckpt(out, summary), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, chosen["state_dict"][f"model.{k}"]), k
    # the codebook buffers travel in the checkpoint too
    assert (
        "model.quantizer.embed" in ckpt["state_dict"]
        and "model.quantizer.cluster_size" in ckpt["state_dict"]
    )


def test_export_from_checkpoint_equals_run_export(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, summary = run
    exported = export(exported_ckpt(out, summary), tmp_path / "m")
    assert content_hash(exported) == content_hash(out / "model")


def test_export_holds_the_weights_with_the_best_validation_loss(tmp_path: Path) -> None:
    cfg = tiny()
    cfg["train"].update(lr=0.3, max_steps=5)  # too high an lr: validation gets worse again
    summary = train_vae(cfg, tmp_path, CPU)
    val = {int(r["step"]): float(r["val/loss"]) for r in read_rows(tmp_path / "metrics.csv")
           if r.get("val/loss")}  # fmt: skip
    # validated after every step of this short run (~10 per run); the last of those saw the
    # final weights, so the stage does not validate them a second time
    assert len(val) == 5
    assert summary["best_val_loss"] == pytest.approx(min(val.values()))
    assert summary["exported"] == "best" and summary["best_step"] < 5  # it diverged
    chosen = torch.load(exported_ckpt(tmp_path, summary), weights_only=True)
    assert chosen["global_step"] == summary["best_step"]
    model = load_pretrained(tmp_path / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, chosen["state_dict"][f"model.{k}"]), k


def test_reconstruction_grid_puts_inputs_above_reconstructions(
    run: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = run
    png = out / "images" / "recon_step0000006.png"
    grid = torchvision.io.decode_png(torchvision.io.read_file(str(png)))  # uint8 [1, H', W']
    # 8 images per row, each 8x8 image shown 4x (32 px, nearest neighbour), padding 2
    assert grid.shape == (1, 2 * 34 + 2, 8 * 34 + 2)
    cfg = DataConfig.from_dict(tiny()["data"])
    val = load_image_splits(cfg).val
    vae = load_pretrained(out / "model")
    assert isinstance(vae, VQVAE)
    model = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    vae.load_state_dict({k[6:]: v for k, v in model.items() if k.startswith("model.")})
    for i in range(8):  # the grid at step 6 shows the step-6 (last) weights
        x = val[i][0]
        col = 2 + i * 34
        assert torch.equal(grid[:, 2:34, col : col + 32], float_to_uint8(upscale(x[None], 32)[0]))
        recon = upscale(vae.decode(vae.encode(x[None])), 32)[0]
        assert torch.equal(grid[:, 36:68, col : col + 32], float_to_uint8(recon))


class _Killed(Exception):
    pass


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 3:
            raise _Killed  # the job dies between checkpoints


def test_rerun_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        train_vae(tiny(), out, CPU, callbacks=[_Crash()])
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2  # the step-2 checkpoint; steps 3.. never happened
    summary = train_vae(tiny(), out, CPU)
    assert summary["global_step"] == 6
    second = read_rows(out / "logs" / "version_1" / "metrics.csv")
    trained = sorted({int(r["step"]) for r in second if r.get("train/loss")})
    assert trained == [2, 3, 4, 5]  # continued at step 2, not restarted at 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    adam_steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6}  # optimizer state carried across the restart


def test_other_config_in_same_out_dir_is_refused(run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = run
    cfg = tiny()
    cfg["train"]["lr"] = 1e-2
    with pytest.raises(ConfigError, match="train.lr"):
        train_vae(cfg, out, CPU)


def test_explicit_field_contradicting_data_is_refused(tmp_path: Path) -> None:
    cfg = tiny()
    cfg["model"]["in_channels"] = 3
    with pytest.raises(ConfigError, match="model.in_channels"):
        train_vae(cfg, tmp_path, CPU)
    assert not (tmp_path / "config.yaml").exists()


def test_tensorboard_logs_when_installed(run: tuple[Path, dict[str, Any]]) -> None:
    pytest.importorskip("tensorboard")
    out, _ = run
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
