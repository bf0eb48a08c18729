"""Device-only defects, caught on a CPU-only machine.

The samplers draw their noise on the CPU from a CPU generator (:func:`sampling_generator`); a
generator built on the model's device is refused by ``draw_noise`` on every GPU. These tests run
the sampling and grid paths with the module's device reported as ``cuda`` (a patched
``.device``), so every branch that looks at the device executes here; the ``gpu`` tests run the
real thing where CUDA exists.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

import vqprior
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.sampling import sampling_generator
from vqprior.train import stages
from vqprior.train.config import DeviceOptions
from vqprior.train.hierarchy_prior import BottomPriorModule, _bottom_grid, _top_grid
from vqprior.train.prior import PriorModule

PACKAGE = Path(vqprior.__file__).resolve().parent
TINY = PACKAGE.parent / "configs" / "tiny"
CPU = DeviceOptions(accelerator="cpu", devices="1", progress=False)
CUDA = torch.device("cuda", 0)
HAS_CUDA = torch.cuda.is_available()


def _generator_calls(tree: ast.AST) -> list[tuple[int, ast.Call]]:
    calls = []
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute):
            calls += [(node.lineno, node)] if ast.unparse(func) == "torch.Generator" else []
    return calls


def test_no_module_builds_a_generator_on_a_device() -> None:
    """One place creates seeded sampling generators, on the CPU; every other generator of the
    package (data shuffling) is a plain CPU ``torch.Generator()``."""
    makers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, call in _generator_calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE)}:{line}"
            if call.args or call.keywords:
                makers.append(where)
    bad = [m for m in makers if not m.startswith("sampling/noise.py")]
    assert not bad, f"torch.Generator built with a device outside sampling_generator: {bad}"
    assert len(makers) == 1  # sampling_generator itself
    gen = sampling_generator(3)
    assert gen.device.type == "cpu"
    assert gen.initial_seed() == 3


@pytest.fixture
def reported_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LightningModule reports ``cuda:0`` as its device; its weights stay on the CPU."""
    monkeypatch.setattr(_DeviceDtypeModuleMixin, "device", property(lambda self: CUDA))


def _codes_prior(spatial: int = 0, classes: int = 3) -> dict[str, Any]:
    return dict(data="codes", num_codes=16, height=4, width=4, channels=8, num_layers=2,
                num_classes=classes, spatial_cond_channels=spatial)  # fmt: skip


def _vae2() -> VQVAE:
    torch.manual_seed(0)
    cfg = dict(in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1, num_codes=16,
               code_dim=4, levels=2, downsample=2)  # fmt: skip
    return VQVAE(VQVAEConfig.from_dict(cfg)).eval()


def test_grid_functions_run_when_the_module_reports_cuda(reported_cuda: None) -> None:
    """The one- and two-level grid functions (which built ``torch.Generator(device=cuda)``)
    sample on the CPU generator and the weights' device."""
    train = {"max_steps": 1, "ema_decay": 0.9, "seed": 5}
    module = PriorModule(_codes_prior(), train)
    assert module.device == CUDA
    cfg = SimpleNamespace(train=SimpleNamespace(num_sample_images=4, seed=5),
                          model=SimpleNamespace(num_classes=3))  # fmt: skip
    pixels, _ = stages._sampler(cfg, None)(module)  # type: ignore[arg-type]
    assert pixels.shape == (4, 4, 4) and pixels.device.type == "cpu"
    vae = _vae2()
    top_cfg = {**_codes_prior(classes=0), "height": 2, "width": 2}
    top_module = PriorModule(top_cfg, train)
    maps, _ = _top_grid(vae, SimpleNamespace(height=8, width=8), 3)(top_module)  # type: ignore[arg-type]
    assert maps.shape == (3, 1, 8, 8)
    bottom = BottomPriorModule(
        _codes_prior(spatial=4, classes=0), train, top_embed=vae.quantizer_top.embed
    )
    bottom.fixed_top = torch.randint(0, 16, (2, 2, 2))
    images, _ = _bottom_grid(vae, 3)(bottom)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_same_seed_same_grid_whatever_the_reported_device(monkeypatch: pytest.MonkeyPatch) -> None:
    train = {"max_steps": 1, "ema_decay": 0.0}
    module = PriorModule(_codes_prior(), train)
    first = module.sample(6, generator=sampling_generator(1))
    monkeypatch.setattr(_DeviceDtypeModuleMixin, "device", property(lambda self: CUDA))
    assert torch.equal(module.sample(6, generator=sampling_generator(1)), first)


def _tiny_pixels(**train: Any) -> dict[str, Any]:
    cfg = yaml.safe_load((TINY / "prior_pixels.yaml").read_text())
    cfg["train"].update(train)
    return cfg


def test_train_prior_finishes_when_the_module_reports_cuda(
    tmp_path: Path, reported_cuda: None
) -> None:
    """The end-of-training grid (which crashed every GPU train-prior before its export) runs
    with the device reported as cuda and writes its PNG."""
    out = tmp_path / "prior"
    stages.train_prior(_tiny_pixels(max_steps=2), out, CPU)
    assert (out / "model" / "model.safetensors").is_file()
    assert list((out / "images").glob("samples_step*.png"))


def test_a_failing_grid_costs_neither_checkpoint_nor_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(cfg: Any, vae: Any) -> Any:
        def make(module: Any) -> Any:
            raise RuntimeError("grid exploded")

        return make

    monkeypatch.setattr(stages, "_sampler", broken)
    out = tmp_path / "prior"
    with caplog.at_level(logging.WARNING):
        summary = stages.train_prior(_tiny_pixels(max_steps=2, image_every_n_steps=1), out, CPU)
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert summary["global_step"] == 2
    warned = [r.getMessage() for r in caplog.records if "grid exploded" in r.getMessage()]
    assert warned and all("\n" not in w for w in warned)
    assert not list((out / "images").glob("*.png"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_generate_on_cuda_equals_cpu(tmp_path: Path) -> None:
    """The same seed gives the same samples on CPU and CUDA (float64: no near ties)."""
    from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig.from_dict(_codes_prior())).double().eval()
    cond = torch.arange(8) % 3
    cpu = model.sample(8, cond=cond, generator=sampling_generator(0))
    gpu = model.to("cuda").sample(8, cond=cond.cuda(), generator=sampling_generator(0))
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_train_prior_on_cuda_bf16(tmp_path: Path) -> None:
    gpu = DeviceOptions(accelerator="cuda", devices="1", precision="bf16-mixed", progress=False)
    out = tmp_path / "prior"
    summary = stages.train_prior(_tiny_pixels(max_steps=4), out, gpu)
    assert (out / "model" / "model.safetensors").is_file()
    assert summary["global_step"] == 4


def _pixels_prior() -> dict[str, Any]:
    return dict(data="pixels", in_channels=1, height=8, width=8, channels=8, num_layers=2)


@pytest.mark.parametrize(
    ("device", "precision", "prior", "vae"),
    [
        ("cpu", "32-true", True, False),  # fp32 CPU: the priors only (see StageModule)
        ("cpu", "bf16-mixed", True, True),
        ("cpu", "64-true", False, False),
        ("cuda", "32-true", True, True),
    ],
)
def test_training_memory_format_follows_device_precision_and_stage(
    monkeypatch: pytest.MonkeyPatch, device: str, precision: str, prior: bool, vae: bool
) -> None:
    """Which modules train in channels-last, with the device patched for the cuda row; the
    weights (and the batch) are converted exactly when the rule says so."""
    from vqprior.train.vae import VQVAEModule

    if device == "cuda":
        monkeypatch.setattr(_DeviceDtypeModuleMixin, "device", property(lambda self: CUDA))
    vae_cfg = dict(in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1,
                   num_codes=16, code_dim=4)  # fmt: skip
    modules = [(PriorModule(_pixels_prior(), {"max_steps": 1}), prior),
               (VQVAEModule(vae_cfg, {"max_steps": 1}), vae)]  # fmt: skip
    for module, expected in modules:
        module._trainer = SimpleNamespace(precision=precision)  # type: ignore[assignment]
        module.on_fit_start()
        assert module.use_channels_last is expected, type(module).__name__
        convs = [p for p in module.parameters() if p.dim() == 4 and p[0].numel() > p.shape[1] > 1]
        assert convs and all(
            p.is_contiguous(memory_format=torch.channels_last) is expected for p in convs
        )
        batch = module.memory_format(torch.zeros(2, 3, 8, 8))
        assert batch.is_contiguous(memory_format=torch.channels_last) is expected
