"""PixelCNN++ step interface: incremental features equal full passes; the cached sampler equals
the reference loop sample for sample (float64), also where fixed-point needs many passes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.nn.pixelcnnpp import PixelCNNPPBackbone
from vqprior.nn.pixelcnnpp_step import PixelCNNPPSteps


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 convolutions: threading only adds overhead (tens of times on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (height, width, num_scales, nr_resnet, cond_dim); the tall ones reuse every map's two row slots
# many times at every scale
BACKBONES = [
    (4, 4, 1, 1, 0),
    (3, 5, 1, 2, 3),
    (4, 6, 2, 2, 0),
    (8, 8, 3, 1, 4),
    (8, 12, 3, 2, 0),
    (16, 4, 2, 1, 0),
    (36, 8, 3, 1, 2),
]


def _net(scales: int, nr_resnet: int, cond_dim: int, scale: float = 2.0) -> PixelCNNPPBackbone:
    torch.manual_seed(scales * 10 + nr_resnet + cond_dim)
    net = PixelCNNPPBackbone(3, 8, nr_resnet, scales, dropout=0.5, cond_dim=cond_dim).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _stepped(net: PixelCNNPPBackbone, x: Tensor, cond: Tensor | None) -> Tensor:
    """Features at every pixel, each read before that pixel is written (raster order)."""
    n, _, h, w = x.shape
    state = PixelCNNPPSteps(net, n, h, w, cond)
    feats = torch.zeros(n, net.channels, h, w, dtype=x.dtype)
    for r in range(h):
        for c in range(w):
            feats[:, :, r, c] = net.step_output(state, r, c)
            net.step_write(state, r, c, x[:, :, r, c])
    return feats


@pytest.mark.parametrize(("h", "w", "scales", "nr_resnet", "cond_dim"), BACKBONES)
def test_stepped_features_equal_the_full_pass(h, w, scales, nr_resnet, cond_dim):
    net = _net(scales, nr_resnet, cond_dim).train()  # dropout 0.5 on: the steps run eval maths
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    cond = torch.randn(2, cond_dim, generator=g, dtype=torch.float64) if cond_dim else None
    got = _stepped(net, x, cond)
    with torch.no_grad():
        want = net.eval()(x, cond)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().amin(dim=(0, 1)).gt(0).any()  # not a degenerate all-zero comparison


def test_pixels_written_before_their_features_are_read():
    """A pixel may be written as soon as the one before it is evaluated (``done``): at the
    start of a row too, before the row starts, while its slot still holds the row two above."""
    net = _net(2, 1, 0).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 12, 4, generator=g, dtype=torch.float64) * 2 - 1
    state = PixelCNNPPSteps(net, 1, 12, 4, None)
    got = torch.zeros(1, net.channels, 12, 4, dtype=torch.float64)
    for r in range(12):
        for c in range(4):
            net.step_write(state, r, c, x[:, :, r, c])
            got[:, :, r, c] = net.step_output(state, r, c)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), rtol=1e-10, atol=1e-12)


def test_features_before_a_write_do_not_see_it_and_reads_are_idempotent():
    net = _net(3, 1, 0).eval()
    state = PixelCNNPPSteps(net, 1, 8, 8, None)
    for c in range(3):
        net.step_output(state, 0, c)
        net.step_write(state, 0, c, torch.ones(1, 3, dtype=torch.float64))
    first = net.step_output(state, 0, 3).clone()
    net.step_write(state, 0, 3, -torch.ones(1, 3, dtype=torch.float64))  # the pixel itself
    assert torch.equal(net.step_output(state, 0, 3), first)
    net.step_write(state, 0, 3, torch.zeros(1, 3, dtype=torch.float64))  # rewrite: allowed
    after = net.step_output(state, 0, 4)
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    x[:, :, 0, :3] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(after, net(x)[:, :, 0, 4], rtol=1e-10, atol=1e-12)


def _state_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from a step state (its maps, blocks, lists)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):  # views of one buffer count once
        storage = obj.untyped_storage()
        if obj.requires_grad or -storage.data_ptr() in seen:
            return 0
        seen.add(-storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if type(obj).__module__ == PixelCNNPPSteps.__module__:
        return sum(_state_bytes(v, seen) for k, v in vars(obj).items() if k != "net")
    return 0


def test_state_memory_does_not_grow_with_the_height():
    """Each map keeps two rows: a 256-row image needs the memory of a 64-row one."""
    net = _net(3, 1, 0).eval()
    short, tall = (_state_bytes(PixelCNNPPSteps(net, 2, h, 8, None)) for h in (64, 256))
    assert tall == short > 0
    wide = _state_bytes(PixelCNNPPSteps(net, 2, 64, 32, None))  # the maps count: they grow
    assert wide - short > 0.5 * short  # with the width (the kernels, a fixed part, do not)


def test_bad_step_calls_raise_one_clear_error():
    net = _net(2, 1, 0).eval()
    with pytest.raises(ValueError, match="divisible by 2"):
        PixelCNNPPSteps(net, 1, 4, 5, None)
    with pytest.raises(ValueError, match="cond_dim=0 but got a cond"):
        PixelCNNPPSteps(net, 1, 4, 4, torch.zeros(1, 3, dtype=torch.float64))
    state = PixelCNNPPSteps(net, 2, 4, 4, None)
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        net.step_output(state, 4, 0)
    with pytest.raises(ValueError, match=r"expects \[2, 3\]"):
        net.step_write(state, 0, 0, torch.zeros(2, 1))
    net.step_output(state, 1, 2)
    with pytest.raises(ValueError, match="behind the evaluated frontier"):
        net.step_write(state, 0, 3, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ahead of the evaluated frontier"):
        net.step_write(state, 2, 1, torch.zeros(2, 3))
    net.step_write(state, 1, 3, torch.zeros(2, 3))  # the next pixel: allowed
    net.step_output(state, 3, 0)
    with pytest.raises(ValueError, match="row 1 are no longer kept"):
        net.step_output(state, 1, 0)


# ------------------------------------------------------------------------- samplers


def _model(scale: float = 2.0, **kw: object) -> PixelCNN:
    base: dict = dict(data="pixels", in_channels=3, height=8, width=8, backbone="pixelcnnpp")
    cfg = PixelCNNConfig(**(base | dict(channels=8, num_mixtures=2, dropout=0.5) | kw))
    torch.manual_seed(0)
    model = PixelCNN(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _draw(model: PixelCNN, method: str, temperature: float, cond: Tensor | None) -> Tensor:
    gen = torch.Generator().manual_seed(5)
    return model.sample(3, cond=cond, temperature=temperature, generator=gen, method=method)


MODELS = {
    "scales1-res2": dict(num_scales=1, nr_resnet=2, height=5, width=4),
    "scales2-res1-cond": dict(num_scales=2, nr_resnet=1, num_classes=3, height=4, width=4),
    "scales3-res2": dict(num_scales=3, nr_resnet=2, height=4, width=8),
    "scales3-res1-cond": dict(num_scales=3, nr_resnet=1, num_classes=2, height=4, width=4),
    "scales2-tall": dict(num_scales=2, nr_resnet=1, height=20, width=4),
    "gray-categorical": dict(
        num_scales=2, nr_resnet=1, in_channels=1, head="categorical", height=4, width=4
    ),
}


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("name", list(MODELS))
def test_cached_sampler_equals_the_reference_loop(name, temperature):
    model = _model(**MODELS[name]).train()  # sampling switches to eval and back
    cfg = model.config
    cond = torch.arange(3) % cfg.num_classes if cfg.num_classes else None
    ref = _draw(model, "naive", temperature, cond)
    for method in ("cached", "auto"):
        assert torch.equal(_draw(model, method, temperature, cond), ref), method
    assert model.training
    assert ref.unique().numel() > 4  # structured, varied samples, not a constant image


def _forward_passes(model: PixelCNN, fn) -> tuple[Tensor, int]:
    calls = []
    handle = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, len(calls)


def test_cached_sampler_is_exact_where_fixed_point_needs_many_passes():
    """Larger weights act like a trained model: strong, long-range dependencies (an untrained
    8x8 model's fixed point converges in about 6 passes, this one needs about 16)."""
    model = _model(scale=2.0, num_scales=3, nr_resnet=1, num_mixtures=3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(5.0 if "conv2" in name else 6.0 if name.startswith("head") else 1.0)
    ref = _draw(model, "naive", 1.0, None)
    fixed, passes = _forward_passes(model, lambda: _draw(model, "fixed_point", 1.0, None))
    cached, cached_passes = _forward_passes(model, lambda: _draw(model, "cached", 1.0, None))
    assert torch.equal(fixed, ref) and torch.equal(cached, ref)
    assert passes >= 12, f"fixed point converged in {passes} passes: the case is too easy"
    assert cached_passes == 0  # no full pass at all: every step is incremental
