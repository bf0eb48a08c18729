"""Causal masks and masked convolutions, checked by brute force through autograd."""

from __future__ import annotations

import itertools

import pytest
import torch

from vqprior.nn.masked import MaskedConv2d, causal_mask, channel_groups


def element_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """|d out[o, i, j] / d x[c, i', j']| for a batch of one: [C_out, H, W, C_in, H, W]."""
    jac = torch.autograd.functional.jacobian(lambda t: fn(t[None])[0], x)
    return jac.abs()


def allowed(gout: torch.Tensor, gin: torch.Tensor, size: int, mask_type: str) -> torch.Tensor:
    """Raster order (row, column, group): may output (o, i, j) see input (c, i', j')?

    Returns a bool tensor [C_out, H, W, C_in, H, W] written from the definition.
    """
    pos = torch.arange(size * size)  # raster index of (i, j)
    before = (pos.view(-1, 1) > pos.view(1, -1)).view(1, size, size, 1, size, size)
    same = (pos.view(-1, 1) == pos.view(1, -1)).view(1, size, size, 1, size, size)
    go = gout.view(-1, 1, 1, 1, 1, 1)
    gi = gin.view(1, 1, 1, -1, 1, 1)
    center = gi < go if mask_type == "A" else gi <= go
    return before | (same & center)


def in_kernel(size: int, p: int) -> torch.Tensor:
    idx = torch.arange(size)
    near = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= p  # [i, i']
    return near.view(1, size, 1, 1, size, 1) & near.view(1, 1, size, 1, 1, size)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_single_masked_conv_is_exactly_causal(
    kernel_size: int, mask_type: str, groups: int
) -> None:
    torch.manual_seed(0)
    cin, cout, size = 2 * groups, 3 * groups, 7
    conv = MaskedConv2d.causal(cin, cout, kernel_size, mask_type, groups).double()
    x = torch.randn(cin, size, size, dtype=torch.float64)
    jac = element_jacobian(conv, x)
    gin, gout = channel_groups(cin, groups), channel_groups(cout, groups)
    ok = allowed(gout, gin, size, mask_type)
    assert torch.all(jac[~ok] == 0), "an output sees its own or a future element"
    live = ok & in_kernel(size, kernel_size // 2)
    assert torch.all(jac[live] > 0), "an allowed connection inside the kernel is dead"


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("groups", [1, 3])
def test_stack_of_masked_convs_never_sees_the_future(kernel_size: int, groups: int) -> None:
    """A then B, B: every output element depends only on strictly earlier input elements."""
    torch.manual_seed(1)
    ch = 2 * groups
    layers = [MaskedConv2d.causal(groups, ch, kernel_size, "A", groups)]
    layers += [MaskedConv2d.causal(ch, ch, kernel_size, "B", groups) for _ in range(2)]
    layers += [MaskedConv2d.causal(ch, groups, 1, "B", groups)]
    net = torch.nn.Sequential(
        *[m for layer in layers for m in (layer, torch.nn.Tanh())][:-1]
    ).double()
    size = 6
    x = torch.randn(groups, size, size, dtype=torch.float64)
    jac = element_jacobian(net, x)
    ok = allowed(torch.arange(groups), torch.arange(groups), size, "A")
    assert torch.all(jac[~ok] == 0)
    assert jac[ok].count_nonzero() > 0


def test_mask_matches_hand_written_3x3_rgb() -> None:
    g = torch.arange(3)
    a = causal_mask(3, "A", g, g)
    b = causal_mask(3, "B", g, g)
    spatial = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    for o, i in itertools.product(range(3), range(3)):
        expect_a, expect_b = spatial.clone(), spatial.clone()
        expect_a[1, 1] = float(i < o)  # R sees nothing of its pixel, G sees R, B sees R and G
        expect_b[1, 1] = float(i <= o)
        assert torch.equal(a[o, i], expect_a)
        assert torch.equal(b[o, i], expect_b)


def test_masked_conv_does_not_mutate_its_weight() -> None:
    conv = MaskedConv2d.causal(3, 6, 5, "A", 3)
    before = conv.weight.detach().clone()
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(conv.weight.detach(), before)
    assert conv.weight.grad is not None
    # gradient of masked taps is exactly zero, so the optimiser never moves them
    assert torch.all(conv.weight.grad[conv.mask == 0] == 0)
    assert (conv.weight[conv.mask == 0] != 0).any()


@pytest.mark.parametrize("bad", [(4, 3), (5, 0)])
def test_channel_groups_rejects_uneven_split(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="channel groups"):
        channel_groups(*bad)


def test_even_kernel_rejected() -> None:
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d.causal(1, 1, 4, "A")


def _reference(conv: MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    weight = conv.weight if conv.mask is None else conv.weight * conv.mask
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, conv.pad), weight, conv.bias)


def test_cached_masked_weight_follows_every_weight_change() -> None:
    """Without autograd the masked weight is reused; any change of the weight is seen."""
    torch.manual_seed(2)
    conv = MaskedConv2d.causal(3, 6, 3, "A", 3)
    x = torch.randn(2, 3, 5, 5)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(conv(x), _reference(conv, x))
            assert conv.masked_weight() is conv.masked_weight()  # cached
        conv(x).square().sum().backward()  # with autograd: a fresh, differentiable product
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.equal(conv(x), _reference(conv, x))
        conv.load_state_dict({k: v + 1 for k, v in conv.state_dict().items()})
        assert torch.equal(conv(x), _reference(conv, x))
        conv.double()
        assert torch.equal(conv(x.double()), _reference(conv, x.double()))
        conv.mask[:, :, 0, 0] = 0  # an edited mask is seen too
        assert torch.equal(conv(x.double()), _reference(conv, x.double()))


def test_an_all_ones_mask_is_skipped_and_gradients_still_flow() -> None:
    ones = causal_mask(1, "B", channel_groups(4, 1), channel_groups(5, 1))
    assert torch.all(ones == 1)
    conv = MaskedConv2d(4, 5, (1, 1), mask=ones)
    assert conv.masked_weight() is conv.weight
    x = torch.randn(2, 4, 3, 3)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    grouped = MaskedConv2d.causal(6, 6, 1, "B", 3)  # several groups: a real mask
    with torch.no_grad():
        assert torch.equal(
            grouped(x[:, :3].repeat(1, 2, 1, 1)), _reference(grouped, x[:, :3].repeat(1, 2, 1, 1))
        )
    assert grouped.masked_weight() is not grouped.weight
