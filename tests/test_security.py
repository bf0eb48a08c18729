"""Nothing a user hands vqprior is unpickled: a checkpoint whose pickle would run code is refused
(and the code never runs); every load in the package is ``weights_only=True`` or safetensors."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from vqprior.cli import cli
from vqprior.io import CheckpointError, load_pretrained, safe_torch_load
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig

PACKAGE = Path(__file__).resolve().parents[1] / "vqprior"
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


class Payload:
    """Unpickling this runs ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-shaped checkpoint with the payload among its hyperparameters."""
    state = {
        "state_dict": {"model.w": torch.zeros(2)},
        "hyper_parameters": {"kind": "vae", "model": {}, "train": Payload(marker)},
        "global_step": 1,
    }
    torch.save(state, path)
    return path


def one_error_line(result: Any, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only the file does run code, so the refusals below matter."""
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses_the_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="refused to load .*possibly unsafe") as info:
        safe_torch_load(ckpt)
    assert "\n" not in str(info.value)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps(Payload(marker), protocol=4))  # a bare pickle, not torch.save
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(plain)
    assert not marker.exists()


def test_export_refuses_the_payload_with_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(tmp_path / "m")])
    line = one_error_line(result)
    assert "refused to load" in line and str(ckpt) in line
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_resuming_from_a_planted_checkpoint_is_refused(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "pwned"
    args = ["train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out)]
    args += ["--set", "train.max_steps=1", "--accelerator", "cpu", "--devices", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    malicious_checkpoint(out / "checkpoints" / "last.ckpt", marker)
    line = one_error_line(CliRunner().invoke(cli, args))
    assert "refused to load" in line
    assert not marker.exists()


def test_an_export_cannot_name_a_class_to_import(tmp_path: Path) -> None:
    model = PixelCNN(PixelCNNConfig(in_channels=1, height=4, width=4, channels=4, num_layers=1))
    path = model.save_pretrained(tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    meta["model_type"] = "os:system"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model_type"):
        load_pretrained(path)


def test_a_hub_model_holding_a_pickle_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub repo with pytorch_model.bin (a pickle) and no safetensors: never unpickled."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model = PixelCNN(PixelCNNConfig(in_channels=1, height=4, width=4, channels=4, num_layers=1))
    export, marker = model.save_pretrained(tmp_path / "m"), tmp_path / "pwned"
    repo = tmp_path / "cache" / "models--evil--model"  # the hub cache's layout
    snapshot = repo / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_bytes((export / "config.json").read_bytes())
    torch.save({"w": Payload(marker)}, snapshot / "pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_pretrained("evil/model", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(dotted name of the callee, call) for every call like ``a.b(...)`` or ``f(...)``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                found.append((".".join([func.id, *reversed(parts)]), node))
    return found


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<absent>"


def test_every_load_in_the_package_is_safe() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    seen_torch_load = 0
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # no aliases that would hide a load from the checks below
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill"):
                assert all(a.name not in ("load", "loads") for a in node.names), path
            if isinstance(node, ast.Import):
                assert all(
                    a.name not in ("pickle", "dill", "cloudpickle", "joblib") for a in node.names
                ), path
        for name, call in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
            if name == "torch.load":
                seen_torch_load += 1
                assert _keyword(call, "weights_only") is True, (
                    f"{where}: torch.load without weights_only=True"
                )
            if name in ("np.load", "numpy.load"):
                assert _keyword(call, "allow_pickle") is False, f"{where}: np.load may unpickle"
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"), (
                f"{where}: {name}"
            )
            assert not name.endswith("load_from_checkpoint"), (
                f"{where}: Lightning's loader unpickles"
            )
    assert seen_torch_load >= 1  # the check above saw safe_torch_load's call


def test_checkpoints_of_real_runs_load_weights_only(tmp_path: Path) -> None:
    """What vqprior writes (Lightning checkpoint with RNG states, hparams) loads safely."""
    out = tmp_path / "run"
    args = ["train-prior", "--config", str(TINY / "prior_pixels.yaml"), "--out", str(out)]
    args += ["--set", "train.max_steps=2", "--accelerator", "cpu", "--devices", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        state = safe_torch_load(ckpt)
        assert state["global_step"] == 2 and "vqprior.ResumeState" in state["callbacks"]
    shutil.rmtree(out)
