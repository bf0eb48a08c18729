"""ONNX export of a VQ-VAE's encoder and decoder and of a PixelCNN's forward pass.

:func:`export_onnx` writes into a directory (usually beside an exported model's safetensors):

- VQ-VAE: ``encoder.onnx``, ``images`` float32 [b, c, H, W] in [-1, 1] -> the codes of every
  level, int64 (``codes`` [b, h, w]; two levels: ``top_codes`` and ``bottom_codes``), and
  ``decoder.onnx``, those codes -> ``images`` float32 [b, c, H, W] in [-1, 1], the eval-mode
  reconstruction. A ``recon="mixture"`` decoder exports its raw output ``params``
  [b, P, H, W] instead: its mode search (:func:`vqprior.nn.mixture.mixture_mode`) is a
  data-dependent loop that does not export. Batch and grid size are dynamic (H, W multiples
  of the downsampling).
- PixelCNN: ``prior.onnx``, ``codes`` int64 [b, h, w] or ``pixels`` float32 [b, c, H, W]
  (+ ``labels`` int64 [b] if class-conditional, + ``spatial_cond`` float32 [b, s, H, W] if it
  has one) -> the head output that ``PixelCNN.forward`` returns: ``logits`` (categorical) or
  mixture ``params``. Only the batch axis is dynamic.
- ``onnx.json``: every graph's inputs and outputs (name, dtype, shape), the opset, versions.

Not exported: sampling. It is a data-dependent sequential walk over raster order with
per-step caches; the graphs give the full forward pass (scoring), not the sampler.
onnx and onnxscript (and onnxruntime to run the files) are the ``vqprior[onnx]`` extra; this
module imports them only inside :func:`export_onnx`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vqprior.io import atomic_path, atomic_write_bytes
from vqprior.models.hierarchy import VQVAE2
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE

__all__ = ["MANIFEST", "OnnxUnavailableError", "export_onnx", "require_onnx"]

MANIFEST = "onnx.json"
MIN_TORCH = (2, 6)
EXTRA = 'pip install "vqprior[onnx]"'
NOT_EXPORTED = (
    "sampling: a data-dependent sequential walk with per-step caches; the graphs give the "
    "full forward pass only"
)


class OnnxUnavailableError(ImportError):
    """onnx or onnxscript is missing (or torch is older than 2.6): the message says what to
    install."""


def require_onnx() -> None:
    """Raise :class:`OnnxUnavailableError` (one line naming the extra) unless onnx and
    onnxscript (the exporter's dependencies) are installed; imports neither."""
    missing = [n for n in ("onnx", "onnxscript") if importlib.util.find_spec(n) is None]
    if missing:
        raise OnnxUnavailableError(f"ONNX export needs {' and '.join(missing)}: {EXTRA}")
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < MIN_TORCH:  # dynamo=True
        raise OnnxUnavailableError(f"ONNX export needs torch >= 2.6, found {torch.__version__}")


class _Graph(NamedTuple):
    """One ONNX file: the module, its example inputs (keyword arguments, in ONNX input order),
    their dynamic axes, and the output names."""

    module: nn.Module
    inputs: dict[str, Tensor]
    dims: dict[str, dict[int, Any]]
    input_names: list[str]
    output_names: list[str]


class _Encoder(nn.Module):
    def __init__(self, vae: VQVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.vae.encode_levels(images))


class _Decoder(nn.Module):
    """Codes (top first) -> images in [-1, 1] (recon=mse) or the raw mixture parameters.

    ``VQVAE.decoder_output`` without its value checks (host syncs that do not trace)."""

    def __init__(self, vae: VQVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, codes: Tensor, bottom_codes: Tensor | None = None) -> Tensor:
        vae = self.vae
        if bottom_codes is None:
            out = vae.decoder(vae.quantizer.lookup(codes))
        else:
            assert isinstance(vae, VQVAE2)
            top = vae.upsample_top(vae.quantizer_top.lookup(codes))
            out = vae.decoder(torch.cat([top, vae.quantizer.lookup(bottom_codes)], dim=1))
        return out.clamp(-1.0, 1.0) if vae.config.recon == "mse" else out


class _Prior(nn.Module):
    def __init__(self, prior: PixelCNN) -> None:
        super().__init__()
        self.prior = prior

    def forward(
        self, x: Tensor, labels: Tensor | None = None, spatial_cond: Tensor | None = None
    ) -> Tensor:
        return self.prior(x, labels, spatial_cond)


def _vae_graphs(vae: VQVAE) -> dict[str, _Graph]:
    cfg = vae.config
    batch, h, w = (torch.export.Dim(n, min=1) for n in ("batch", "h", "w"))
    tds = cfg.top_downsample if cfg.levels == 2 else 1
    ds = cfg.downsample * tds  # the image is ds times the top (or only) grid
    images = torch.zeros(2, cfg.in_channels, 2 * ds, 3 * ds)
    codes = [torch.zeros(2, 2 * s, 3 * s, dtype=torch.long) for s in (1, tds)[: cfg.levels]]
    code_dims = [{0: batch, 1: s * h, 2: s * w} for s in (1, tds)[: cfg.levels]]
    names = ["codes"] if cfg.levels == 1 else [f"{n}_codes" for n in vae.level_names]
    args = ["codes", "bottom_codes"][: cfg.levels]
    return {
        "encoder.onnx": _Graph(
            _Encoder(vae),
            {"images": images},
            {"images": {0: batch, 2: ds * h, 3: ds * w}},
            ["images"],
            names,
        ),
        "decoder.onnx": _Graph(
            _Decoder(vae),
            dict(zip(args, codes, strict=True)),
            dict(zip(args, code_dims, strict=True)),
            names,
            ["images" if cfg.recon == "mse" else "params"],
        ),
    }


def _prior_graph(prior: PixelCNN) -> _Graph:
    cfg = prior.config
    batch = torch.export.Dim("batch", min=1)
    dtype = torch.long if cfg.data == "codes" else torch.float32
    inputs = {"x": torch.zeros(2, *prior.data_shape, dtype=dtype)}
    names = [cfg.data]  # "codes" or "pixels"
    if cfg.num_classes:
        inputs["labels"], names = torch.zeros(2, dtype=torch.long), [*names, "labels"]
    if cfg.spatial_cond_channels:
        shape = (2, cfg.spatial_cond_channels, cfg.height, cfg.width)
        inputs["spatial_cond"], names = torch.zeros(shape), [*names, "spatial_cond"]
    output = "params" if cfg.mixture else "logits"
    return _Graph(_Prior(prior), inputs, {k: {0: batch} for k in inputs}, names, [output])


def _save(graph: _Graph, path: Path) -> dict[str, Any]:
    """Export ``graph`` to ``path`` (atomically); its inputs, outputs and opset."""
    import onnx

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
        program = torch.onnx.export(
            graph.module.eval(),
            (),
            kwargs=graph.inputs,
            dynamo=True,
            dynamic_shapes=graph.dims,
            input_names=graph.input_names,
            output_names=graph.output_names,
            verbose=False,
        )
    assert program is not None
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
    proto = program.model_proto
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

    def describe(values: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {
        "inputs": describe(proto.graph.input),
        "outputs": describe(proto.graph.output),
        "opset": opset,
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_onnx(model: VQVAE | PixelCNN, out_dir: str | Path) -> list[Path]:
    """Write the ONNX graphs of ``model`` (see the module docstring) and ``onnx.json`` into
    ``out_dir``; returns the paths of the ``.onnx`` files. The graphs are fp32 (traced on
    the CPU: a model elsewhere or in another dtype is copied, never changed)."""
    require_onnx()
    weight = next(model.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    training = model.training
    graphs = _vae_graphs(model) if isinstance(model, VQVAE) else {"prior.onnx": _prior_graph(model)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        files = {name: _save(graph, out / name) for name, graph in graphs.items()}
    finally:
        model.train(training)
    manifest: dict[str, Any] = {
        "model_type": model.model_type,
        "opset": max(f.pop("opset") for f in files.values()),
        "versions": {n: _version(n) for n in ("vqprior", "torch", "onnx", "onnxscript")},
        "files": files,
        "not_exported": NOT_EXPORTED,
    }
    if isinstance(model, VQVAE) and model.config.recon == "mixture":
        manifest["decoder_output"] = (
            "raw discretized logistic mixture parameters (the mode search does not export): "
            "take the mode with vqprior.nn.mixture.mixture_mode"
        )
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return [out / name for name in graphs]
