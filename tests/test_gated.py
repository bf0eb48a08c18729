"""Gated PixelCNN stacks: exact causality and no blind spot, by brute force through autograd."""

from __future__ import annotations

import pytest
import torch

from vqprior.nn.gated import CausalHead, GatedStack, conv1x1_fp32
from vqprior.nn.layout import channel_halves, is_channels_last
from vqprior.nn.masked import channel_groups
from vqprior.nn.step import LayerOut, StepContext


def expected_field(size: int, groups: int, layers: int, p: int) -> torch.Tensor:
    """Bool [G, H, W, G, H, W]: output (go, i, j) sees input (gi, i', j') in a gated stack.

    Derived by hand: L layers of reach p give the rectangle rows i-Lp .. i-1, columns
    j-Lp .. j+Lp (vertical stack), the current row's columns j-Lp .. j-1 (horizontal stack),
    and earlier channel groups of the pixel itself (type A at the centre).
    """
    idx = torch.arange(size)
    di = idx.view(-1, 1) - idx.view(1, -1)  # i - i'
    above = (di >= 1) & (di <= layers * p)
    row = di == 0
    dj = idx.view(-1, 1) - idx.view(1, -1)  # j - j'
    cols_v = dj.abs() <= layers * p
    cols_h = (dj >= 1) & (dj <= layers * p)
    same = row.view(size, 1, size, 1) & (dj == 0).view(1, size, 1, size)
    spatial = (above.view(size, 1, size, 1) & cols_v.view(1, size, 1, size)) | (
        row.view(size, 1, size, 1) & cols_h.view(1, size, 1, size)
    )  # [i, j, i', j']
    g = torch.arange(groups)
    lower = g.view(-1, 1) > g.view(1, -1)  # [go, gi]
    out = spatial.view(1, size, size, 1, size, size) | (
        same.view(1, size, size, 1, size, size) & lower.view(groups, 1, 1, groups, 1, 1)
    )
    return out.expand(groups, size, size, groups, size, size)


def group_outputs(stack: GatedStack, groups: int):
    def fn(x: torch.Tensor) -> torch.Tensor:
        skips = stack(x)  # [b, F, H, W]; channel groups are contiguous blocks
        return skips.view(skips.shape[0], groups, -1, *skips.shape[2:]).sum(2)

    return fn


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gated_stack_field_is_exactly_the_causal_cone(
    kernel_size: int, groups: int, layers: int
) -> None:
    torch.manual_seed(layers)
    size = 7
    stack = GatedStack(groups, 4 * groups, layers, kernel_size, groups).double()
    x = torch.randn(groups, size, size, dtype=torch.float64)
    fn = group_outputs(stack, groups)
    jac = torch.autograd.functional.jacobian(lambda t: fn(t[None])[0], x).abs()
    expect = expected_field(size, groups, layers, kernel_size // 2)
    assert torch.all(jac[~expect] == 0), "the stack sees the current or a future element"
    assert torch.all(jac[expect] > 0), "blind spot: an earlier element in the field is unseen"


def test_conditioned_stack_field_is_exactly_the_causal_cone() -> None:
    """With class and spatial conditioning every allowed connection is present, none other."""
    torch.manual_seed(0)
    size, layers = 6, 2
    stack = GatedStack(1, 8, layers, 3, 1, cond_dim=4, spatial_channels=2).double()
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    cond = torch.randn(1, 4, dtype=torch.float64)
    spatial = torch.randn(1, 2, size, size, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: stack(t[None], cond, spatial)[0], x[0])
    jac = jac.abs().sum(0)  # [H, W, 1, H, W]: any feature channel
    expect = expected_field(size, 1, layers, 1)[0, :, :, 0]
    assert torch.all(jac[:, :, 0][~expect] == 0), "the stack sees the current or a future element"
    assert torch.all(jac[:, :, 0][expect] > 0), "blind spot: an earlier element is unseen"
    assert not torch.allclose(stack(x, cond * 2, spatial), stack(x, cond, spatial))
    assert not torch.allclose(stack(x, cond, spatial * 2), stack(x, cond, spatial))


def test_head_keeps_group_causality() -> None:
    """Every output group sees every hidden channel of its own and earlier groups, no later."""
    torch.manual_seed(0)
    groups, f, n = 3, 6, 4
    out_groups = channel_groups(groups * n, groups)
    head = CausalHead(f, groups * n, groups, out_groups).double()
    with torch.no_grad():  # positive weights keep every ReLU open: the Jacobian is structural
        for p in head.parameters():
            p.abs_()
    x = torch.rand(1, f, 1, 1, dtype=torch.float64) + 0.1
    jac = torch.autograd.functional.jacobian(lambda t: head(t)[0, :, 0, 0], x)[:, 0, :, 0, 0]
    hid = channel_groups(f, groups)
    forbidden = out_groups.view(-1, 1) < hid.view(1, -1)
    assert torch.all(jac[forbidden] == 0)
    assert torch.all(jac[~forbidden] != 0), "an allowed connection is missing"


def test_every_parameter_gets_a_gradient() -> None:
    """No unused weights: plain DDP (find_unused_parameters=False) requires it."""
    stack = GatedStack(3, 6, 3, 3, 3, cond_dim=2, spatial_channels=1)
    out = stack(torch.randn(2, 3, 5, 5), torch.randn(2, 2), torch.randn(2, 1, 5, 5))
    out.sum().backward()
    missing = [name for name, p in stack.named_parameters() if p.grad is None]
    assert not missing, missing


class PrefixMeanBlock(torch.nn.Module):
    """A toy causal block with an attention-like preallocated cache: h(t) = h_in(t) +
    W mean_{t' <= t} h_in(t'), written at t = r * W + c (so re-evaluation is idempotent)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, v, h, cond=None, spatial=None) -> LayerOut:
        b, f, hh, ww = h.shape
        seq = h.flatten(2)  # [b, F, T]
        prefix = seq.cumsum(2) / torch.arange(1, hh * ww + 1, dtype=h.dtype)
        mixed = self.proj(prefix.transpose(1, 2)).transpose(1, 2)
        return LayerOut(v, h + mixed.view(b, f, hh, ww), None)

    def start_steps(self, ctx: StepContext):
        cache = torch.zeros(ctx.n, self.proj.in_features, ctx.height * ctx.width, dtype=ctx.dtype)
        out = torch.zeros(ctx.n, ctx.pad + ctx.width, self.proj.in_features, dtype=ctx.dtype)
        return dict(cache=cache, out=out, pad=ctx.pad, width=ctx.width)

    def step_row(self, state, r: int, v_in: torch.Tensor) -> torch.Tensor:
        return v_in

    def step_element(self, state, r: int, c: int, h_in: torch.Tensor, skips: torch.Tensor):
        t, at = r * state["width"] + c, state["pad"] + c
        state["cache"][:, :, t] = h_in[:, at]
        mean = state["cache"][:, :, : t + 1].mean(2)
        state["out"][:, at] = h_in[:, at] + self.proj(mean)
        return state["out"], skips  # no skip of its own


@pytest.mark.parametrize("groups", [1, 3])
def test_stack_steps_equal_the_forward_pass_at_every_element(groups: int) -> None:
    """The step protocol computes exactly the forward pass, element by element, also with a
    foreign block (the attention hook) inside the stack and with conditioning."""
    torch.manual_seed(0)
    size, f = 5, 6
    stack = GatedStack(groups, f, 3, 3, groups, cond_dim=2, spatial_channels=1).double()
    if groups == 1:
        stack.layers.insert(1, PrefixMeanBlock(f).double())
    x = torch.randn(2, groups, size, size, dtype=torch.float64)
    cond = torch.randn(2, 2, dtype=torch.float64)
    spatial = torch.randn(2, 1, size, size, dtype=torch.float64)
    with torch.no_grad():
        full = stack(x, cond, spatial)
        ctx = StepContext(2, size, size, cond, spatial, x.device, x.dtype)
        state = stack.start_steps(ctx)
        for r in range(size):
            for c in range(size):
                for g in range(groups):  # evaluate once per group, as a sampler does
                    partial = torch.zeros(2, groups, dtype=x.dtype)
                    partial[:, :g] = x[:, :g, r, c]
                    stack.step_write(state, r, c, partial)
                    out = stack.step_output(state, r, c)
                    lo, hi = g * f // groups, (g + 1) * f // groups
                    assert torch.allclose(out[:, lo:hi], full[:, lo:hi, r, c], atol=1e-12)
                stack.step_write(state, r, c, x[:, :, r, c])


def test_head_steps_equal_the_heads_and_keep_the_last_layer_in_float32() -> None:
    """Each head's one-element function (``start_steps``) equals its full 1x1 pass: exactly
    in float64, and under bf16 autocast (the branch that turns autocast off) it returns
    float32 within bf16 rounding of the full pass, for both heads."""
    from vqprior.models.pixelcnn import Conv1x1Head

    torch.manual_seed(1)
    heads = [CausalHead(6, 12, 3, channel_groups(12, 3)), Conv1x1Head(6, 10)]
    for head in heads:
        feats = torch.randn(4, 6, dtype=torch.float64)
        head64 = head.double()
        with torch.no_grad():
            full = head64(feats[:, :, None, None])[:, :, 0, 0]
            step = head64.start_steps(torch.float64)(feats)
        assert step.dtype == torch.float64 and torch.allclose(step, full, atol=1e-12)
        head32, x = head.float(), feats.float()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            full = head32(x[:, :, None, None])[:, :, 0, 0]
            step = head32.start_steps(torch.float32)(x)
        assert step.dtype == torch.float32 and full.dtype == torch.float32
        assert torch.allclose(step, full, atol=5e-2)


def test_channel_halves_are_dense_for_16_bit_channels_last_and_views_otherwise() -> None:
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    a, b = channel_halves(x)  # NCHW: the chunk views themselves
    assert a.data_ptr() == x.data_ptr() and torch.equal(b, x[:, 3:])
    xc = x.contiguous(memory_format=torch.channels_last)
    a, b = channel_halves(xc)  # float64 channels-last: views too
    assert a.data_ptr() == xc.data_ptr() and torch.equal(b, x[:, 3:])
    xb = xc.bfloat16()
    a, b = channel_halves(xb)  # 16-bit channels-last on CPU: dense copies
    assert torch.equal(a, xb[:, :3]) and torch.equal(b, xb[:, 3:])
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b))
    assert is_channels_last(xc) and not is_channels_last(x)
    one = torch.zeros(2, 1, 3, 4).contiguous(memory_format=torch.channels_last)
    assert not is_channels_last(one)  # one channel: both layouts at once, the plain one wins
    assert is_channels_last(xc[:, :, 1:, :-1]) and not is_channels_last(x[:, :, 1:, :-1])  # crops
    assert is_channels_last(xc[:, :3]) and not is_channels_last(x[:, :3])  # channel slices
    # off the CPU (meta stands in for a GPU here) the halves stay views
    xm = torch.empty(2, 6, 3, 4, device="meta", dtype=torch.bfloat16)
    xm = xm.contiguous(memory_format=torch.channels_last)
    a, b = channel_halves(xm)
    assert not a.is_contiguous(memory_format=torch.channels_last)
    assert a.stride() == xm.stride() and b.storage_offset() == 3


def test_gated_stack_is_the_same_map_in_either_memory_format() -> None:
    torch.manual_seed(0)
    stack = GatedStack(in_channels=3, channels=8, num_layers=3, kernel_size=3).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = stack(x)
    cl = torch.channels_last
    got = stack.to(memory_format=cl)(x.contiguous(memory_format=cl))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "crop"])
def test_last_1x1_is_the_convolution_with_an_nchw_output(layout: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 1).double()
    x = torch.randn(3, 6, 4, 7, dtype=torch.float64)
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "crop":
        x = x[:, :, 1:, :-2]  # a crop of a channels-last map
    x.requires_grad_(True)
    got = conv1x1_fp32(conv, x)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    assert got.is_contiguous()  # NCHW, as the likelihoods read it
    grad = torch.randn_like(want)
    params = (x, conv.weight, conv.bias)
    for g_got, g_want in zip(
        torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True
    ):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
    (g_x,) = torch.autograd.grad(conv1x1_fp32(conv, x), (x,), grad)
    assert is_channels_last(g_x) == (layout != "nchw")  # the input's layout: no mixed layouts
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 under autocast
        assert conv1x1_fp32(conv.float(), x.detach().float().bfloat16()).dtype == torch.float32
