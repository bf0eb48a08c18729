"""Gated PixelCNN stacks: exact causality and no blind spot, by brute force through autograd."""

from __future__ import annotations

import pytest
import torch

from vqprior.nn.gated import CausalHead, GatedStack
from vqprior.nn.masked import channel_groups


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


def test_conditioned_stack_stays_causal_and_uses_the_condition() -> None:
    torch.manual_seed(0)
    stack = GatedStack(1, 8, 2, 3, 1, cond_dim=4, spatial_channels=2).double()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(1, 4, dtype=torch.float64)
    spatial = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out = stack(x, cond, spatial)
    out[0, :, 3, 2].sum().backward()
    grad = x.grad[0, 0].abs()
    flat = grad.flatten()
    assert torch.all(flat[3 * 6 + 2 :] == 0)
    assert flat[: 3 * 6 + 2].count_nonzero() > 0
    assert not torch.allclose(stack(x, cond * 2, spatial), out)
    assert not torch.allclose(stack(x, cond, spatial * 2), out)


def test_head_keeps_group_causality() -> None:
    torch.manual_seed(0)
    groups, f, n = 3, 6, 4
    out_groups = channel_groups(groups * n, groups)
    head = CausalHead(f, groups * n, groups, out_groups).double()
    x = torch.randn(1, f, 1, 1, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: head(t)[0, :, 0, 0], x)[:, 0, :, 0, 0]
    hid = channel_groups(f, groups)
    forbidden = out_groups.view(-1, 1) < hid.view(1, -1)
    assert torch.all(jac[forbidden] == 0)
    assert torch.all(jac[~forbidden].abs().sum() > 0)


def test_every_parameter_gets_a_gradient() -> None:
    """No unused weights: plain DDP (find_unused_parameters=False) requires it."""
    stack = GatedStack(3, 6, 3, 3, 3, cond_dim=2, spatial_channels=1)
    out = stack(torch.randn(2, 3, 5, 5), torch.randn(2, 2), torch.randn(2, 1, 5, 5))
    out.sum().backward()
    missing = [name for name, p in stack.named_parameters() if p.grad is None]
    assert not missing, missing
