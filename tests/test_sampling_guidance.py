"""Truncated sampling (top_k / top_p) and classifier-free guidance: fast == reference."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from model_cases import CASES, build

from vqprior import PixelCNN, PixelCNNConfig
from vqprior.nn.categorical import categorical_sample
from vqprior.nn.grid import from_bins
from vqprior.sampling import draw_noise, raster

CATEGORICAL = [
    n for n, kw in CASES.items() if kw["data"] == "codes" or kw.get("head") == "categorical"
]
GUIDED = {
    "codes": dict(data="codes", num_codes=5, height=3, width=4, channels=8, num_layers=2),
    "rgb-categorical": dict(
        data="pixels", in_channels=3, head="categorical", num_bins=8, height=3, width=3,
        channels=6, num_layers=2,
    ),
}  # fmt: skip


def draw(model, n=4, seed=7, **kw) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("name", CATEGORICAL)
def test_truncated_fast_samplers_equal_the_reference(name: str) -> None:
    model, cond, spatial = build(name, 4, sharpen=True)
    for trunc in (dict(top_k=2), dict(top_p=0.7), dict(top_k=3, top_p=0.9)):
        ref = draw(model, cond=cond, spatial_cond=spatial, method="naive", **trunc)
        for method in ("auto", "fixed_point"):
            got = draw(model, cond=cond, spatial_cond=spatial, method=method, **trunc)
            assert torch.equal(got, ref), f"{method} {trunc}"
        assert not torch.equal(ref, draw(model, cond=cond, spatial_cond=spatial, **trunc, seed=8))


@pytest.mark.parametrize("name", CATEGORICAL)
def test_top_k_one_is_temperature_zero(name: str) -> None:
    model, cond, spatial = build(name, 4, sharpen=True)
    greedy = draw(model, cond=cond, spatial_cond=spatial, temperature=0.0)
    assert torch.equal(draw(model, cond=cond, spatial_cond=spatial, top_k=1), greedy)
    assert not torch.equal(draw(model, cond=cond, spatial_cond=spatial), greedy)


def guided_model(name: str) -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**GUIDED[name], num_classes=3, class_dropout=0.1))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model


def guided_reference(model: PixelCNN, cond: torch.Tensor, scale: float, seed: int, **trunc):
    """The guided reference loop, written out: two full passes per step (with the labels,
    with the null class), log-probabilities mixed per categorical distribution."""
    n, cfg = cond.shape[0], model.config
    noise = draw_noise(model, n, torch.Generator().manual_seed(seed), torch.device("cpu"))
    assert noise.u is not None
    x = torch.zeros(
        (n, *model.data_shape), dtype=torch.long if cfg.data == "codes" else torch.float64
    )
    null = torch.full_like(cond, cfg.num_classes)
    cats = 1 if cfg.data == "codes" else cfg.in_channels
    for r, c, group in raster(model):
        with torch.no_grad():
            lp = [
                torch.log_softmax(
                    rearrange(model(x, lab)[:, :, r, c], "b (c k) -> b k c", c=cats), 1
                )
                for lab in (cond, null)
            ]
        logits = (1 + scale) * lp[0] - scale * lp[1]  # [n, k, cats]
        idx = categorical_sample(logits, noise.u[:, :cats, r, c], 1.0, **trunc)  # [n, cats]
        if cfg.data == "codes":
            x[:, r, c] = idx[:, 0]
        else:
            x[:, group, r, c] = from_bins(idx[:, group], cfg.num_bins, torch.float64)
    return x


@pytest.mark.parametrize("name", list(GUIDED))
def test_guided_samplers_equal_the_guided_reference_loop(name: str) -> None:
    model = guided_model(name)
    cond = torch.tensor([0, 1, 2, 1])
    for scale, trunc in ((1.5, {}), (3.0, dict(top_k=3))):
        ref = guided_reference(model, cond, scale, 7, **trunc)
        for method in ("naive", "cached", "fixed_point"):
            got = draw(model, cond=cond, guidance=scale, method=method, **trunc)
            assert torch.equal(got, ref), f"{method} at guidance {scale}"
    assert not torch.equal(ref, draw(model, cond=cond))  # guidance changes the samples


@pytest.mark.parametrize("name", list(GUIDED))
def test_guidance_zero_is_the_conditional_prior(name: str) -> None:
    model = guided_model(name)
    cond = torch.tensor([2, 0, 1, 1])
    assert torch.equal(draw(model, cond=cond, guidance=0.0), draw(model, cond=cond))


def test_guidance_and_truncation_arguments_are_checked() -> None:
    plain, cond, _ = build("codes-cond-k5", 2)
    with pytest.raises(ValueError, match="class_dropout"):
        plain.sample(2, cond=cond, guidance=1.0)
    model = guided_model("codes")
    with pytest.raises(ValueError, match="pass cond"):
        model.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        model.sample(2, cond=torch.tensor([0, 3]))  # the null class is not a user label
    with pytest.raises(ValueError, match="top_k"):
        model.sample(2, cond=cond, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.sample(2, cond=cond, top_p=1.5)
    mix = PixelCNN(PixelCNNConfig(**CASES["rgb-mixture-cond"], class_dropout=0.1))
    with pytest.raises(ValueError, match="mixture"):
        mix.sample(2, cond=torch.tensor([0, 1]), guidance=1.0)


def test_class_dropout_adds_a_null_class() -> None:
    model = guided_model("codes")
    assert model.null_class == 3 and model.class_embed is not None
    assert model.class_embed.num_embeddings == 4
    x = torch.zeros(2, 3, 4, dtype=torch.long)
    lp_null = model.log_prob(x, torch.tensor([3, 3]))  # training sees the null label
    assert not torch.allclose(lp_null, model.log_prob(x, torch.tensor([0, 0])))
    with pytest.raises(ValueError, match="class_dropout"):
        PixelCNNConfig(class_dropout=0.1)  # unconditional: nothing to drop


def test_training_step_drops_labels_to_the_null_class_only_in_training() -> None:
    from vqprior.train.prior import PriorModule

    cfg = dict(GUIDED["codes"], num_classes=3, class_dropout=0.5)
    module = PriorModule(cfg, {})
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    seen: list[torch.Tensor] = []
    log_prob = module.model.log_prob
    module._log_prob["fn"] = lambda x, c, **kw: (seen.append(c), log_prob(x, c))[1]
    module.eval_model.log_prob = lambda x, c, **kw: (seen.append(c), log_prob(x, c))[1]  # type: ignore[method-assign]
    x, y = torch.randint(5, (256, 3, 4)), torch.randint(3, (256,))
    torch.manual_seed(0)
    module._step((x, y), "train")
    dropped = seen[-1] == 3
    assert 0.4 < float(dropped.float().mean()) < 0.6  # about class_dropout of the labels
    assert torch.equal(seen[-1][~dropped], y[~dropped])  # the others are kept
    module._step((x, y), "val")
    assert torch.equal(seen[-1], y)  # validation never drops labels
