"""Causal self-attention block: causality, normalisation, step == forward, cached == naive."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.config import ConfigError
from vqprior.nn.attention import AttentionBlock, position_encoding
from vqprior.nn.grid import from_bins
from vqprior.nn.step import StepContext

CODES = dict(data="codes", num_codes=5, height=3, width=4, channels=8, num_layers=3)
RGB = dict(data="pixels", in_channels=3, height=2, width=3, channels=8, num_layers=3)
GRAY = dict(data="pixels", in_channels=1, height=3, width=3, channels=8, num_layers=2)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny float64 models: intra-op threads only add overhead (100x per step on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(
    base: dict, every: int, cond: bool = False, spatial: bool = False, n: int = 2, **extra: object
) -> tuple[PixelCNN, Tensor | None, Tensor | None]:
    """A float64 eval-mode model with attention, its labels and spatial map for n examples."""
    cfg = PixelCNNConfig(
        **base,  # type: ignore[arg-type]
        attention_every=every,
        attention_heads=2,
        num_classes=3 if cond else 0,
        spatial_cond_channels=2 if spatial else 0,
        **extra,  # type: ignore[arg-type]
    )
    torch.manual_seed(0)
    model = PixelCNN(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # sharper: structured samples and strong attention
    labels = torch.arange(n) % 3 if cond else None
    g = torch.Generator().manual_seed(1)
    smap = torch.randn(n, 2, cfg.height, cfg.width, generator=g, dtype=torch.float64)
    return model, labels, smap if spatial else None


def random_data(model: PixelCNN, n: int, seed: int = 2) -> Tensor:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    if cfg.data == "codes":
        return torch.randint(0, cfg.num_codes, (n, cfg.height, cfg.width), generator=g)
    idx = torch.randint(0, cfg.num_bins, (n, cfg.in_channels, cfg.height, cfg.width), generator=g)
    return from_bins(idx, cfg.num_bins, torch.float64)


def elements(model: PixelCNN) -> list[tuple[int, ...]]:
    """Every element index of one example in raster order (row, column, then channel)."""
    cfg = model.config
    if cfg.data == "codes":
        return list(itertools.product(range(cfg.height), range(cfg.width)))
    return [
        (ch, r, c)
        for r, c, ch in itertools.product(
            range(cfg.height), range(cfg.width), range(cfg.in_channels)
        )
    ]


def perturbed(model: PixelCNN, x: Tensor, e: tuple[int, ...]) -> Tensor:
    y, cfg = x.clone(), model.config
    at: tuple[slice | int, ...] = (slice(None), *e)
    if cfg.data == "codes":
        y[at] = (y[at] + 1) % cfg.num_codes
    else:
        y[at] = -y[at] + 2.0 / (cfg.num_bins - 1)
        y = y.clamp(-1.0, 1.0)
    return y


CAUSAL_CASES = [
    ("codes", 1, False, False),
    ("codes", 2, True, True),
    ("rgb", 1, True, True),
]


@pytest.mark.parametrize(("kind", "every", "cond", "spatial"), CAUSAL_CASES)
def test_log_prob_is_causal_exactly(kind: str, every: int, cond: bool, spatial: bool) -> None:
    """Changing any element leaves every earlier element's log-prob bit-identical, and some
    later element's log-prob changes (the model does look back, also through attention)."""
    model, labels, smap = make(CODES if kind == "codes" else RGB, every, cond, spatial)
    x = random_data(model, 2)
    base = model.log_prob(x, labels, reduction="none", spatial_cond=smap)
    order = elements(model)
    flat = lambda lp: torch.stack([lp[(slice(None), *e)] for e in order], 1)  # noqa: E731
    base_flat = flat(base)
    moved_later = 0
    for i, e in enumerate(order):
        lp = flat(model.log_prob(perturbed(model, x, e), labels, "none", smap))
        assert torch.equal(lp[:, :i], base_flat[:, :i]), f"element {i} leaks into earlier ones"
        moved_later += int(not torch.equal(lp[:, i + 1 :], base_flat[:, i + 1 :]))
    assert moved_later >= len(order) - 2


def test_attention_reaches_beyond_the_convolutions() -> None:
    """One gated layer of kernel 3 sees one row up; with attention the first element of the
    last row depends on the first element of the map (a far, non-local dependency)."""
    model, _, _ = make(dict(CODES, num_layers=2, height=6, width=6), 1)
    x = random_data(model, 2)
    base = model.log_prob(x, reduction="none")
    far = model.log_prob(perturbed(model, x, (0, 0)), reduction="none")
    assert not torch.equal(far[:, 5, 5], base[:, 5, 5])
    no_att, _, _ = make(dict(CODES, num_layers=2, height=6, width=6), 0)
    a = no_att.log_prob(x, reduction="none")
    b = no_att.log_prob(perturbed(no_att, x, (0, 0)), reduction="none")
    assert torch.equal(a[:, 5, 0], b[:, 5, 0])  # without attention it is out of reach


@pytest.mark.parametrize(("every", "cond", "spatial"), [(1, False, False), (2, True, True)])
def test_normalises_over_all_codes(every: int, cond: bool, spatial: bool) -> None:
    model, labels, smap = make(CODES, every, cond, spatial)
    x = random_data(model, 2)
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        total = torch.zeros(2, dtype=torch.float64)
        for k in range(model.config.num_codes):
            y = x.clone()
            y[:, r, c] = k
            total += model.log_prob(y, labels, "none", smap)[:, r, c].exp()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


@pytest.mark.parametrize(
    ("base", "channel", "every"),
    [(GRAY, 0, 1), (dict(GRAY, head="categorical", num_layers=3), 0, 2), (RGB, 1, 1), (RGB, 2, 2)],
)
def test_normalises_over_all_256_values(base: dict, channel: int, every: int) -> None:
    model, labels, smap = make(base, every, cond=True, spatial=True)
    x = random_data(model, 2)
    assert labels is not None and smap is not None
    r, c = 1, 1
    ys = x[None].repeat(256, 1, 1, 1, 1)  # [256, 2, C, H, W]
    ys[:, :, channel, r, c] = from_bins(torch.arange(256), 256, torch.float64)[:, None]
    lp = model.log_prob(ys.flatten(0, 1), labels.repeat(256), "none", smap.repeat(256, 1, 1, 1))
    total = lp.view(256, 2, *lp.shape[1:])[:, :, channel, r, c].exp().sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-10)


SAMPLER_CASES = [  # kind, attention_every, class, spatial, truncation, temperature
    ("codes", 1, False, False, {}, 1.0),
    ("codes", 2, True, True, {}, 0.7),
    ("codes", 1, True, False, dict(top_k=3), 1.0),
    ("codes", 1, False, True, {}, 0.0),
    ("rgb", 1, True, True, {}, 1.0),
    ("rgb", 2, False, False, {}, 0.0),
    ("gray-categorical", 1, True, False, dict(top_p=0.8), 0.7),
]


@pytest.mark.parametrize(
    ("kind", "every", "cond", "spatial", "trunc", "temperature"), SAMPLER_CASES
)
def test_cached_sampler_equals_the_reference_loop(
    kind: str, every: int, cond: bool, spatial: bool, trunc: dict, temperature: float
) -> None:
    """float64 models: the cached sampler returns the reference loop's samples exactly."""
    base = {"codes": CODES, "rgb": RGB, "gray-categorical": dict(GRAY, head="categorical")}[kind]
    model, labels, smap = make(base, every, cond, spatial, n=3)

    def draw(method: str, seed: int = 7) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.sample(3, labels, temperature, gen, method=method, spatial_cond=smap, **trunc)

    ref = draw("naive")
    assert torch.equal(draw("cached"), ref)
    if temperature > 0:
        assert not torch.equal(draw("cached", seed=8), ref)


def block_inputs(n: int, f: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(n, f, h, w, generator=g, dtype=torch.float64)
    hs = torch.randn(n, f, h, w, generator=g, dtype=torch.float64)
    cond = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return v, hs, cond


def test_block_steps_reproduce_forward_and_are_idempotent() -> None:
    """step_element at every (r, c), each evaluated first on a wrong input and then on the
    right one (the last evaluation wins), equals the full pass; the vertical stream passes."""
    n, f, h, w, pad = 2, 8, 3, 5, 2
    torch.manual_seed(4)
    block = AttentionBlock(channels=f, heads=4, cond_dim=5, spatial_channels=2).double()
    v, hs, cond = block_inputs(n, f, h, w)
    smap = torch.randn(n, 2, h, w, dtype=torch.float64)
    full = block(v, hs, cond, smap)
    assert torch.equal(full.v, v) and full.skip is not None
    ctx = StepContext(n, h, w, cond, smap, torch.device("cpu"), torch.float64, pad)
    state = block.start_steps(ctx)
    for r in range(h):
        assert torch.equal(block.step_row(state, r, v[:, :, r]), v[:, :, r])
        row = torch.zeros(n, pad + w, f, dtype=torch.float64)  # [n, pad + W, F]
        row[:, pad:] = hs[:, :, r].transpose(1, 2)
        before = torch.randn(n, f, dtype=torch.float64)  # the skips of the blocks before
        for c in range(w):
            wrong = row.clone()
            wrong[:, pad + c] = 7.0
            block.step_element(state, r, c, wrong, before)
            out, skips = block.step_element(state, r, c, row, before)
            assert torch.allclose(out[:, pad + c], full.h[:, :, r, c], atol=1e-12)
            assert torch.allclose(skips - before, full.skip[:, :, r, c], atol=1e-12)
            assert torch.equal(out[:, :pad], torch.zeros(n, pad, f, dtype=torch.float64))


def test_block_full_pass_is_causal_in_raster_order() -> None:
    """Output at t depends on the horizontal stream at j <= t only (zero Jacobian above)."""
    n, f, h, w = 1, 4, 2, 3
    torch.manual_seed(5)
    block = AttentionBlock(channels=f, heads=2).double()
    v, hs, _ = block_inputs(n, f, h, w)
    jac = torch.autograd.functional.jacobian(lambda t: block(v, t).h, hs)  # [1,f,h,w,1,f,h,w]
    dep = jac.abs().sum(dim=(0, 1, 4, 5)).flatten(0, 1).flatten(1, 2)  # [t_out, t_in]
    t = h * w
    later = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    assert (dep[later] == 0).all() and (dep[~later] > 0).all()


def test_position_encoding_and_config_errors() -> None:
    pe = position_encoding(4, 5, 8, torch.float64, "cpu")
    assert pe.shape == (20, 8)
    assert torch.unique(pe, dim=0).shape[0] == 20  # every position distinct
    assert torch.equal(pe[7], position_encoding(4, 5, 8, torch.float64, "cpu")[7])
    assert position_encoding(2, 2, 7, torch.float32, "cpu").shape == (4, 7)
    with pytest.raises(ConfigError, match="channel group"):
        PixelCNNConfig(
            data="pixels", in_channels=3, head="categorical", channels=12, attention_every=1
        )
    with pytest.raises(ConfigError, match="channel group"):
        AttentionBlock(channels=12, heads=2, groups=3)
    with pytest.raises(ConfigError, match="divisible"):
        AttentionBlock(channels=10, heads=4)
    model, _, _ = make(CODES, 2)
    kinds = [type(b).__name__ for b in model.backbone.layers]  # type: ignore[union-attr]
    assert kinds == ["GatedLayer", "GatedLayer", "AttentionBlock", "GatedLayer"]


@pytest.mark.parametrize("causal", [False, True])
def test_attend_runs_in_float32_on_cpu_under_bf16_autocast(causal: bool) -> None:
    """On CPU the attention product runs in float32 (and float64 stays float64) whatever
    autocast asks for; the other branch (CUDA's: the inputs' own dtype) runs here too and
    agrees to bf16 rounding."""
    from vqprior.nn.attention import _attend, attend

    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=causal)
        native = _attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=causal, float32=False)
    assert wide.dtype == torch.float32 and native.dtype == torch.bfloat16
    assert torch.allclose(wide, exact, atol=3e-2) and torch.allclose(
        native.float(), exact, atol=3e-2
    )
    q64, k64, v64 = q.double(), k.double(), v.double()
    out64 = attend(q64, k64, v64, is_causal=causal)
    assert out64.dtype == torch.float64
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    assert torch.allclose(out64, ref, atol=1e-12)
