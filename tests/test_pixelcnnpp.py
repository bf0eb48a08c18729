"""PixelCNN++ backbone: exact dependency sets of every shifted layer and of the whole network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_cases import PP
from torch import Tensor, nn

from vqprior.nn.pixelcnnpp import PixelCNNPPBackbone
from vqprior.nn.pixelcnnpp_layers import (
    DownRightShiftedConv2d,
    DownRightShiftedDeconv2d,
    DownShiftedConv2d,
    DownShiftedDeconv2d,
    GatedResnet,
    concat_elu,
    concat_elu_into,
    down_shift,
    residual_gate,
    right_shift,
)


def _dependency(fn: nn.Module, x0: Tensor, out_hw: tuple[int, int], **kwargs: Tensor) -> Tensor:
    """``dep[i, j, i', j']``: does the channel-summed output at (i, j) depend on input (i', j')?

    One backward pass: the batch holds one copy of ``x0 [1, c, h, w]`` per output pixel and
    copy ``n`` back-propagates only its own pixel (the network is per-example).
    """
    oh, ow = out_hw
    n = oh * ow
    x = x0.expand(n, -1, -1, -1).clone().requires_grad_(True)
    extra = {k: v.expand(n, *v.shape[1:]) for k, v in kwargs.items()}
    out = fn(x, **extra)
    idx = torch.arange(n)
    out[idx, :, idx // ow, idx % ow].sum().backward()
    assert x.grad is not None
    grad = x.grad.abs().sum(dim=1)  # [n, h, w]
    return (grad != 0).reshape(oh, ow, *x0.shape[-2:])


def _expected(out_hw: tuple[int, int], in_hw: tuple[int, int], reads) -> Tensor:
    """Brute-force dependency set: ``reads(i, j)`` lists the input positions, clipped here."""
    dep = torch.zeros(*out_hw, *in_hw, dtype=torch.bool)
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            for a, b in reads(i, j):
                if 0 <= a < in_hw[0] and 0 <= b < in_hw[1]:
                    dep[i, j, a, b] = True
    return dep


def _earlier(h: int, w: int) -> Tensor:
    """``[h, w, h, w]``: is input pixel (i', j') strictly before (i, j) in raster order?"""
    r = torch.arange(h * w)
    return (r[None, :] < r[:, None]).reshape(h, w, h, w)


def _backbone(h: int, w: int, scales: int, nr_resnet: int, cond_dim: int = 0) -> nn.Module:
    torch.manual_seed(h * 100 + w * 10 + scales + nr_resnet)
    model = PixelCNNPPBackbone(3, 8, nr_resnet, scales, dropout=0.5, cond_dim=cond_dim)
    return model.double().eval()


def _x(h: int, w: int, c: int = 3) -> Tensor:
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# ---------------------------------------------------------------- pure helpers and layers


def test_concat_elu_matches_definition():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    elu = torch.where(x > 0, x, torch.expm1(x))
    elu_neg = torch.where(-x > 0, -x, torch.expm1(-x))
    torch.testing.assert_close(concat_elu(x), torch.cat([elu, elu_neg], dim=1))
    points = x[:, :, 0, 0]  # [n, c], the sampler's: the plain form
    torch.testing.assert_close(concat_elu(points), torch.cat([elu, elu_neg], 1)[:, :, 0, 0])


@pytest.mark.parametrize("dim", [1, -1])
def test_concat_elu_into_writes_the_definition_into_a_strided_buffer(dim):
    """The sampler's form: into a slice of a bigger buffer (not contiguous), along ``dim``,
    touching nothing else; extreme values stay finite and exact."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 30.0
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, -1e300], dtype=torch.float64)
    want = torch.cat([F.elu(x), F.elu(-x)], dim=dim)
    buf = torch.full((3, *want.shape[1:-1], want.shape[-1] + 2), 7.0, dtype=torch.float64)
    out = buf[1:, ..., 1:-1]  # a strided view inside the buffer
    assert not out.is_contiguous()
    assert concat_elu_into(x, out, dim=dim) is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (buf[0] == 7.0).all() and (buf[..., 0] == 7.0).all() and (buf[..., -1] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_gate_and_its_gradient_are_autograds_of_the_definition(dtype, channels_last):
    """Bit for bit against autograd through ``x + a * sigmoid(b)`` on the chunk views, in each
    dtype and layout; the gradient of ``c`` comes back in ``c``'s layout."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 4, 5, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    c = (torch.randn(2, 6, 4, 5, dtype=dtype) * 4).contiguous(memory_format=fmt)
    c.requires_grad_()
    grad = torch.randn(2, 3, 4, 5, dtype=dtype).contiguous(memory_format=fmt)
    a, b = c.chunk(2, dim=1)
    want = torch.addcmul(x, a, torch.sigmoid(b))
    want_grads = torch.autograd.grad(want, (x, c), grad)
    got = residual_gate(x, c)
    got_grads = torch.autograd.grad(got, (x, c), grad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert got_grads[1].is_contiguous(memory_format=fmt)
    with torch.no_grad():  # the sampler's rows: the plain ops
        torch.testing.assert_close(residual_gate(x, c), want, rtol=0, atol=0)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(residual_gate, (x, c))
        (only_x,) = torch.autograd.grad(residual_gate(x, c.detach()), x, grad)  # c frozen
        torch.testing.assert_close(only_x, grad, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0), (0, 2, 0, 1)])
def test_padded_concat_elu_is_the_padded_definition_with_its_gradient(
    fused, channels_last, pads, monkeypatch
):
    from vqprior.nn import pixelcnnpp_layers

    # these maps are small: move the size above which the fused form is taken
    monkeypatch.setattr(pixelcnnpp_layers, "FUSED_CONCAT_ELU_MIN", -1 if fused else 1 << 30)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-30])  # the kinks
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if channels_last and pads == (0, 2, 0, 1):
        x = F.pad(x, (0, 0, 1, 0))[:, :, :-1]  # a crop of a channels-last map, as down_shift's
    x.requires_grad_(True)
    got = concat_elu(x, pads)
    want = F.pad(
        torch.where(
            torch.cat([x, -x], 1) > 0, torch.cat([x, -x], 1), torch.expm1(torch.cat([x, -x], 1))
        ),
        pads,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert (type(got.grad_fn).__name__ == "_ConcatEluBackward") == fused
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    grad = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, x, grad)
    (g_want,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: concat_elu(t, pads), (x.detach()[:1, :2].clone().requires_grad_(True),)
    )


def test_fused_concat_elu_has_no_cpu_only_step(monkeypatch) -> None:
    from vqprior.nn import pixelcnnpp_layers

    monkeypatch.setattr(pixelcnnpp_layers, "FUSED_CONCAT_ELU_MIN", -1)
    x = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    y = concat_elu(x.requires_grad_(True), (1, 1, 1, 0))  # meta stands in for a GPU
    assert y.shape == (2, 6, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(y, x, torch.empty_like(y))
    assert g.shape == x.shape


def test_shifts_move_by_one_and_fill_zero():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    d, r = down_shift(x), right_shift(x)
    assert d.shape == r.shape == x.shape
    assert torch.equal(d[..., 0, :], torch.zeros(1, 1, 4))
    assert torch.equal(d[..., 1:, :], x[..., :-1, :])
    assert torch.equal(r[..., :, 0], torch.zeros(1, 1, 3))
    assert torch.equal(r[..., :, 1:], x[..., :, :-1])


@pytest.mark.parametrize("kernel", [(2, 3), (1, 3), (3, 5)])
def test_down_shifted_conv_reads_rows_above_and_centred_columns(kernel):
    kh, kw = kernel
    conv = DownShiftedConv2d(2, 3, kernel).double()
    dep = _dependency(conv, _x(5, 6, 2), (5, 6))
    reads = lambda i, j: [  # noqa: E731
        (i - a, j + b) for a in range(kh) for b in range(-(kw // 2), kw // 2 + 1)
    ]
    assert torch.equal(dep, _expected((5, 6), (5, 6), reads))


@pytest.mark.parametrize("kernel", [(2, 2), (2, 1), (3, 2)])
def test_down_right_shifted_conv_reads_above_and_left(kernel):
    kh, kw = kernel
    conv = DownRightShiftedConv2d(2, 3, kernel).double()
    dep = _dependency(conv, _x(5, 6, 2), (5, 6))
    reads = lambda i, j: [(i - a, j - b) for a in range(kh) for b in range(kw)]  # noqa: E731
    assert torch.equal(dep, _expected((5, 6), (5, 6), reads))


def test_strided_shifted_convs_halve_and_read_the_block_corner():
    x = _x(6, 8, 2)
    down = DownShiftedConv2d(2, 3, (2, 3), stride=2).double()
    dep = _dependency(down, x, (3, 4))
    reads = lambda p, q: [(2 * p - a, 2 * q + b) for a in (0, 1) for b in (-1, 0, 1)]  # noqa: E731
    assert torch.equal(dep, _expected((3, 4), (6, 8), reads))
    down_right = DownRightShiftedConv2d(2, 3, (2, 2), stride=2).double()
    dep = _dependency(down_right, x, (3, 4))
    reads = lambda p, q: [(2 * p - a, 2 * q - b) for a in (0, 1) for b in (0, 1)]  # noqa: E731
    assert torch.equal(dep, _expected((3, 4), (6, 8), reads))


def test_shifted_deconvs_double_and_read_the_parent_row():
    x = _x(3, 4, 2)
    up = DownShiftedDeconv2d(2, 3).double()
    dep = _dependency(up, x, (6, 8))
    reads = lambda y, c: [(y // 2, b) for b in range(c // 2, (c + 1) // 2 + 1)]  # noqa: E731
    assert torch.equal(dep, _expected((6, 8), (3, 4), reads))
    up_right = DownRightShiftedDeconv2d(2, 3).double()
    dep = _dependency(up_right, x, (6, 8))
    assert torch.equal(dep, _expected((6, 8), (3, 4), lambda y, c: [(y // 2, c // 2)]))


UPSAMPLERS = {  # each CPU form against its transposed convolution, cropped as the layer does
    "down": (DownShiftedDeconv2d, lambda y: y[:, :, :8, 1:13]),
    "down_right": (DownRightShiftedDeconv2d, lambda y: y),
}


@pytest.mark.parametrize("kind", sorted(UPSAMPLERS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsamplers_equal_their_transposed_convolution(kind, channels_last):
    """The convolution + pixel shuffle against ``conv_transpose2d`` itself: values and the
    gradients of the input, weight and bias; the output keeps the input's memory format."""
    make, crop = UPSAMPLERS[kind]
    up = make(3, 5).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = up(x)
    ref = crop(F.conv_transpose2d(x, up.deconv.weight, up.deconv.bias, stride=2))
    assert y.shape == ref.shape == (2, 5, 8, 12)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-13)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn_like(y)
    wrt = [x, up.deconv.weight, up.deconv.bias]
    grads = zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True)
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(UPSAMPLERS))
def test_upsamplers_off_the_cpu_are_the_transposed_convolution(kind) -> None:
    up = UPSAMPLERS[kind][0](3, 5)
    calls: list[str] = []
    up.deconv.register_forward_hook(lambda m, i, o: calls.append(o.device.type))
    up(torch.randn(2, 3, 4, 6))
    assert calls == []  # on CPU: the convolution and the shuffle
    up = up.to("meta")  # meta stands in for a GPU
    assert up(torch.empty(2, 3, 4, 6, device="meta")).shape == (2, 5, 8, 12)
    assert calls == ["meta"]  # elsewhere: the transposed convolution module itself


@pytest.mark.parametrize("fused", [False, True])
def test_gated_resnet_is_the_same_map_in_either_memory_format(fused, monkeypatch):
    block = GatedResnet(4, lambda i, o: DownShiftedConv2d(i, o), aux_channels=4).double().eval()
    x, aux = (torch.randn(2, 4, 5, 6, dtype=torch.float64) for _ in range(2))
    c2 = block.conv2(concat_elu(block.conv1(concat_elu(x)) + block.nin_aux(concat_elu(aux))))
    a, b = c2.chunk(2, dim=1)
    want = x + a * torch.sigmoid(b)  # the definition
    from vqprior.nn import pixelcnnpp_layers

    monkeypatch.setattr(pixelcnnpp_layers, "FUSED_CONCAT_ELU_MIN", -1 if fused else 1 << 30)
    cl = torch.channels_last
    got_cl = block.to(memory_format=cl)(
        x.contiguous(memory_format=cl), aux.contiguous(memory_format=cl)
    )
    torch.testing.assert_close(block(x, aux), want, rtol=0, atol=1e-13)
    torch.testing.assert_close(got_cl, want, rtol=0, atol=1e-13)
    assert got_cl.is_contiguous(memory_format=cl)


# ---------------------------------------------------------------- the whole backbone


@pytest.mark.parametrize(
    ("h", "w", "scales", "nr_resnet"),
    [(8, 8, 3, 1), (4, 6, 2, 2), (8, 8, 1, 1), (6, 6, 1, 2), (4, 8, 3, 1)],
)
@pytest.mark.parametrize("fused", [False, True])  # concat_elu's two forms (sized by elements)
def test_backbone_is_strictly_causal_without_a_local_blind_spot(
    h, w, scales, nr_resnet, fused, monkeypatch
):
    from vqprior.nn import pixelcnnpp_layers

    monkeypatch.setattr(pixelcnnpp_layers, "FUSED_CONCAT_ELU_MIN", -1 if fused else 1 << 30)
    model = _backbone(h, w, scales, nr_resnet)
    dep = _dependency(model, _x(h, w), (h, w))
    earlier = _earlier(h, w)
    assert not (dep & ~earlier).any(), "an output sees its own pixel or a later one"
    # every config sees the row above (j-1..j+1) and the pixel to the left: no blind spot
    local = [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
    near = _expected((h, w), (h, w), lambda i, j: [(i + a, j + b) for a, b in local])
    assert dep[near].all(), "a nearby earlier pixel is invisible (blind spot)"


@pytest.mark.parametrize(("h", "w", "scales", "nr_resnet"), [(4, 6, 2, 2), (6, 6, 1, 2)])
def test_backbone_sees_every_earlier_pixel_when_the_field_covers_the_image(h, w, scales, nr_resnet):
    model = _backbone(h, w, scales, nr_resnet)
    dep = _dependency(model, _x(h, w), (h, w))
    assert torch.equal(dep, _earlier(h, w))


def test_backbone_output_shape_and_all_input_channels_used():
    model = _backbone(4, 6, 2, 2)
    x = _x(4, 6).requires_grad_(True)
    out = model(x)
    assert out.shape == (1, 8, 4, 6)
    out[:, :, -1, -1].sum().backward()
    assert x.grad is not None
    assert (x.grad[0, :, :-1].abs().sum(dim=(1, 2)) > 0).all()  # every channel of earlier rows


# ---------------------------------------------------------------- conditioning


def test_conditioning_changes_every_output_and_keeps_causality():
    h, w = 4, 8
    model = _backbone(h, w, 3, 1, cond_dim=5)
    g = torch.Generator().manual_seed(3)
    c1 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    c2 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    x = _x(h, w)
    with torch.no_grad():
        diff = (model(x, c1) - model(x, c2)).abs().amax(dim=1)
    assert (diff > 0).all(), "cond must reach every pixel, including (0, 0)"
    dep = _dependency(model, x, (h, w), cond=c1)
    assert not (dep & ~_earlier(h, w)).any()


def test_cond_is_required_exactly_when_cond_dim_is_positive():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="cond of shape"):
        PixelCNNPPBackbone(3, 8, 1, 1, cond_dim=4)(x)
    with pytest.raises(ValueError, match="cond of shape"):
        PixelCNNPPBackbone(3, 8, 1, 1, cond_dim=4)(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cond_dim=0"):
        PixelCNNPPBackbone(3, 8, 1, 1)(x, torch.zeros(2, 4))


# ---------------------------------------------------------------- errors and dropout


def test_size_not_divisible_by_the_scales_is_a_clear_error():
    model = PixelCNNPPBackbone(1, 8, 1, 3)
    with pytest.raises(ValueError, match=r"divisible by 4, got H=6, W=8"):
        model(torch.zeros(1, 1, 6, 8))
    with pytest.raises(ValueError, match=r"divisible by 4, got H=8, W=10"):
        model(torch.zeros(1, 1, 8, 10))
    with pytest.raises(ValueError, match=r"\[b, 1, H, W\]"):
        model(torch.zeros(1, 3, 8, 8))
    assert model(torch.zeros(1, 1, 4, 12)).shape == (1, 8, 4, 12)


@pytest.mark.parametrize(
    "kwargs",
    [{"channels": 0}, {"nr_resnet": 0}, {"num_scales": 0}, {"dropout": 1.0}, {"cond_dim": -1}],
)
def test_bad_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PixelCNNPPBackbone(3, **kwargs)


def test_dropout_is_stochastic_in_train_mode_only():
    torch.manual_seed(0)
    model = PixelCNNPPBackbone(3, 8, 1, 2, dropout=0.5)
    x = torch.randn(2, 3, 4, 4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    no_dropout = PixelCNNPPBackbone(3, 8, 1, 2, dropout=0.0).train()
    assert torch.equal(no_dropout(x), no_dropout(x))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.125])  # 0.3: fp32 uniforms; else uniform bytes
def test_dropout_keeps_one_minus_p_and_rescales_like_nn_dropout(p):
    from vqprior.nn.pixelcnnpp_layers import Dropout

    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.ones(64, 8, 16, 16, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)  # 131k draws
    if p != 0.3:  # exactly the bytes >= 256 p: redraw them from the same seed
        from vqprior.nn.pixelcnnpp_layers import random_bytes_like

        torch.manual_seed(0)
        assert torch.equal(kept, random_bytes_like(x) >= int(256 * p))
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad != 0, kept)  # dropped elements get no gradient
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert drop(cl).is_contiguous(memory_format=torch.channels_last)
    assert drop(x.detach().bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)


def test_random_bytes_are_uniform_in_every_byte_lane_and_follow_the_memory_format():
    from vqprior.nn.pixelcnnpp_layers import random_bytes_like

    torch.manual_seed(0)
    x = torch.empty(5, 7, 9, 11)  # 3465 values: not a multiple of 8
    assert random_bytes_like(x).shape == x.shape
    cl = torch.empty(4, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    assert random_bytes_like(cl).stride() == cl.stride()
    assert random_bytes_like(torch.empty(6, 8)[:, ::2]).shape == (6, 4)  # not dense
    flat = random_bytes_like(torch.empty(2**20)).long()
    for lane in range(8):  # each of the 8 bytes of a 64-bit draw is uniform over 0..255
        counts = torch.bincount(flat[lane::8], minlength=256).double()
        expected = flat[lane::8].numel() / 256
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 255 + 6 * (2 * 255) ** 0.5  # 255 degrees of freedom, ~6 sigma
    cells = (flat[0::8] // 16) * 16 + flat[1::8] // 16  # 16x16 table of neighbouring lanes
    counts = torch.bincount(cells, minlength=256).double()
    expected = cells.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 255 + 6 * (2 * 255) ** 0.5


def test_compiled_training_step_runs_with_dropout() -> None:
    """``--compile`` on the PixelCNN++ backbone: dropout's mask draw and the input checks trace
    (no dtype view, no host sync) and the compiled loss back-propagates to every weight."""
    from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig

    torch.manual_seed(0)
    cfg = PixelCNNConfig(
        in_channels=1, height=8, width=8, channels=8, num_mixtures=2, dropout=0.5, **PP
    )
    model = PixelCNN(cfg)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    log_prob = torch.compile(model.log_prob, fullgraph=True)  # fails on any graph break
    loss = -log_prob(x, reduction="mean")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
