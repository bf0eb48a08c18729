"""ONNX export (vqprior.onnx_export, `vqprior export --onnx`): the graphs run in onnxruntime
and match PyTorch on tiny random fp32 models, at another batch size than the export's.

Tolerances: the largest |ONNX - PyTorch| measured (onnxruntime 1.32 CPU, torch 2.14, 64
examples of every prior case below, weights sharpened as here) is 9.1e-6 for head outputs,
4.8e-6 nats for a per-element log-prob (6.1e-5 for a per-example sum) and 6e-8 for decoded
pixel values in [-1, 1]; VQ-VAE codes are equal. The bounds leave a 10x margin for other
CPUs' kernels.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from model_cases import build, random_data

from vqprior import VQVAE, VQVAEConfig, load_pretrained
from vqprior.io import content_hash
from vqprior.models.pixelcnn import PixelCNN
from vqprior.nn.mixture import mixture_log_prob
from vqprior.onnx_export import MANIFEST, export_onnx
from vqprior.train.inference import export

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LOG_PROB_TOL = 1e-4  # nats per element
HEAD_TOL = 1e-4  # raw head output (logits, mixture parameters)
IMAGE_TOL = 1e-6  # decoded pixel values in [-1, 1]
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
VAE = dict(hidden_channels=8, res_channels=4, num_res_blocks=1, downsample=2, num_codes=16)


def run(path: Path, **inputs: Any) -> list[np.ndarray]:
    """Run an ONNX file on CPU in onnxruntime: inputs by name -> its outputs."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return session.run(None, feed)


def log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    top = z.max(axis=axis, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=axis, keepdims=True))


def numpy_log_prob(prior: PixelCNN, logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-element log-probs (shape of ``x``) from a categorical head's output, in numpy:
    codes [b, K, h, w]; pixels [b, (c n), H, W] (channel c's n bins at c * n ...)."""
    cfg = prior.config
    if cfg.data == "codes":
        return np.take_along_axis(log_softmax(logits, 1), x[:, None], 1)[:, 0]
    b, _, h, w = logits.shape
    lp = log_softmax(logits.reshape(b, cfg.in_channels, cfg.num_bins, h, w), 2)
    bins = np.clip(np.rint((x + 1.0) * (cfg.num_bins - 1) / 2), 0, cfg.num_bins - 1)
    return np.take_along_axis(lp, bins.astype(np.int64)[:, :, None], 2)[:, :, 0]


@pytest.mark.parametrize(
    "name",
    [
        "codes-cond-attention",  # gated codes prior with classes (and attention)
        "codes-k7-spatial",  # spatial condition input
        "rgb-mixture-cond",  # pixel prior, mixture head
        "rgb-categorical",  # pixel prior, categorical head with channel groups
        "rgb-pixelcnnpp",  # PixelCNN++ backbone, mixture head
        "gray-pixelcnnpp-cond-categorical",  # PixelCNN++ backbone, classes, categorical head
    ],
)
def test_prior_graph_scores_like_pytorch(name: str, tmp_path: Path) -> None:
    n = 5  # the export traced batch 2: the batch axis is dynamic
    prior, labels, spatial = build(name, n, sharpen=True, dtype=torch.float32)
    (path,) = export_onnx(prior, tmp_path)
    x = random_data(prior, n, torch.Generator().manual_seed(2))
    x = x if prior.config.data == "codes" else x.float()
    feed = {prior.config.data: x, "labels": labels, "spatial_cond": spatial}
    (out,) = run(path, **{k: v for k, v in feed.items() if v is not None})
    with torch.no_grad():
        head = prior(x, labels, spatial)
        lp = prior.log_prob(x, labels, reduction="none", spatial_cond=spatial)
    assert out.shape == tuple(head.shape) and out.dtype == np.float32
    assert np.abs(out - head.numpy()).max() < HEAD_TOL
    if prior.config.mixture:  # scored from the ONNX output by the library's mixture math
        ort_lp = mixture_log_prob(
            x, torch.from_numpy(out), prior.config.num_mixtures, prior.config.num_bins
        ).numpy()
    else:
        ort_lp = numpy_log_prob(prior, out, x.numpy())
    assert ort_lp.shape == tuple(lp.shape)
    assert np.abs(ort_lp - lp.numpy()).max() < LOG_PROB_TOL
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    inputs = [i["name"] for i in manifest["files"]["prior.onnx"]["inputs"]]
    assert inputs == [k for k, v in feed.items() if v is not None]
    assert manifest["files"]["prior.onnx"]["inputs"][0]["shape"][0] == "batch"
    assert manifest["opset"] >= 18 and manifest["versions"]["onnx"]


def test_two_level_vae_from_a_model_dir_encodes_and_decodes_like_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(in_channels=3, code_dim=4, levels=2, **VAE)).eval()
    model_dir = vae.save_pretrained(tmp_path / "vae")
    before = content_hash(model_dir)
    export(model_dir, model_dir, onnx=True)  # an exported dir: its graphs go beside its files
    assert content_hash(model_dir) == before and isinstance(load_pretrained(model_dir), VQVAE)
    images = torch.rand(3, 3, 12, 16) * 2 - 1  # another batch and size than the export's
    top, bottom = run(model_dir / "encoder.onnx", images=images)
    levels = vae.encode_levels(images)
    assert top.dtype == np.int64 and np.array_equal(top, levels.top.numpy())
    assert np.array_equal(bottom, levels.bottom.numpy())
    (decoded,) = run(model_dir / "decoder.onnx", top_codes=top, bottom_codes=bottom)
    with torch.no_grad():
        assert np.abs(decoded - vae.decode_levels(*levels).numpy()).max() < IMAGE_TOL
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert [o["name"] for o in manifest["files"]["encoder.onnx"]["outputs"]] == [
        "top_codes",
        "bottom_codes",
    ]


def test_mixture_decoder_exports_its_raw_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(in_channels=3, code_dim=4, recon="mixture", num_mixtures=2, **VAE))
    export_onnx(vae.eval(), tmp_path)
    codes = torch.randint(16, (3, 5, 4))
    (params,) = run(tmp_path / "decoder.onnx", codes=codes)
    with torch.no_grad():
        assert np.abs(params - vae.decoder_output(codes).numpy()).max() < HEAD_TOL
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["files"]["decoder.onnx"]["outputs"][0]["name"] == "params"
    assert "mixture_mode" in manifest["decoder_output"]


def test_cli_export_onnx_of_a_trained_vae(tmp_path: Path) -> None:
    from vqprior.cli import cli
    from vqprior.train.config import DeviceOptions
    from vqprior.train.stages import train_vae

    run_dir = tmp_path / "vae"
    cpu = DeviceOptions(accelerator="cpu", devices="1", progress=False)
    train_vae(yaml.safe_load((TINY / "vae.yaml").read_text()), run_dir, cpu)
    out = tmp_path / "exported"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = CliRunner().invoke(cli, ["export", str(ckpt), str(out), "--onnx"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["onnx"] == [str(out / "decoder.onnx"), str(out / "encoder.onnx")]
    vae = load_pretrained(out)
    assert isinstance(vae, VQVAE)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    (codes,) = run(out / "encoder.onnx", images=images)
    assert np.array_equal(codes, vae.encode(images).numpy())
    (decoded,) = run(out / "decoder.onnx", codes=codes)
    with torch.no_grad():
        assert np.abs(decoded - vae.decode(torch.from_numpy(codes)).numpy()).max() < IMAGE_TOL


def test_export_onnx_without_the_extra_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqprior.cli import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else find_spec(n, *a)
    )
    model_dir = VQVAE(VQVAEConfig(in_channels=1, code_dim=4, **VAE)).save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(cli, ["export", str(model_dir), str(tmp_path / "o"), "--onnx"])
    assert result.exit_code != 0 and 'pip install "vqprior[onnx]"' in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    plain = CliRunner().invoke(cli, ["export", str(model_dir), str(tmp_path / "o")])
    assert plain.exit_code == 2 and "--onnx" in plain.output


def test_importing_the_cli_and_the_exporter_loads_no_onnx() -> None:
    code = (
        "import sys, vqprior.cli, vqprior.onnx_export; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', "
        "'onnxruntime')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
