"""One training step for every prior: the bottom prior's inputs, class dropout, compile, metrics,
and no host sync per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vqprior.models.levels import upsample_codes as upsample_top_codes
from vqprior.train.hierarchy_prior import BottomPriorModule
from vqprior.train.prior import PriorModule

K, D = 6, 3  # top codebook: codes, code dim
BOTTOM = dict(data="codes", num_codes=K, height=4, width=6, channels=8, num_layers=2,
              spatial_cond_channels=D, num_classes=3, class_dropout=0.5)  # fmt: skip
# no weight decay: only gradients move the class embedding rows
TRAIN = {"max_steps": 10, "ema_decay": 0.0, "lr": 1e-2, "weight_decay": 0.0}


def bottom_module(compile: bool = False) -> BottomPriorModule:
    torch.manual_seed(0)
    embed = torch.randn(K, D)
    module = BottomPriorModule(BOTTOM, TRAIN, compile=compile, top_embed=embed)
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer here
    return module


def bottom_batch(b: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    bottom = torch.randint(K, (b, 4, 6), generator=gen)
    return bottom, torch.randint(3, (b,), generator=gen), torch.randint(K, (b, 2, 2), generator=gen)


def test_bottom_training_step_trains_the_null_class() -> None:
    """Class dropout applies to the bottom prior: its null class row learns."""
    module = bottom_module()
    class_embed = module.model.class_embed
    assert class_embed is not None and module.model.null_class == 3
    null_before = class_embed.weight[3].detach().clone()
    labels_before = class_embed.weight[:3].detach().clone()
    opt = module.configure_optimizers()["optimizer"]
    batch = bottom_batch()
    for step in range(3):
        opt.zero_grad()
        loss = module.training_step(batch, step)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert not torch.allclose(class_embed.weight[3], null_before)
    assert not torch.allclose(class_embed.weight[:3], labels_before)


def test_the_compile_flag_compiles_every_priors_train_log_prob() -> None:
    """``--compile`` wraps the trained model's log_prob in torch.compile, bottom prior included."""
    plain = PriorModule(dict(BOTTOM, spatial_cond_channels=0), TRAIN, compile=True)
    for module in (bottom_module(compile=True), plain):
        fn = module._log_prob["fn"]
        assert getattr(fn, "_torchdynamo_orig_callable", None) == module.model.log_prob
    module = bottom_module()
    assert module._log_prob["fn"] == module.model.log_prob  # without the flag: eager


def test_plain_and_bottom_priors_log_the_same_metrics() -> None:
    """The names stages and pipelines read: loss, nats_per_code, bits_per_image per stage."""
    bottom, plain = bottom_module(), PriorModule(dict(BOTTOM, spatial_cond_channels=0), TRAIN)
    logged: dict[str, set[str]] = {"bottom": set(), "plain": set()}
    bottom.log_dict = lambda d, **k: logged["bottom"].update(d)  # type: ignore[method-assign]
    plain.log_dict = lambda d, **k: logged["plain"].update(d)  # type: ignore[method-assign]
    for module, batch in ((bottom, bottom_batch()), (plain, bottom_batch()[:2])):
        module._step(batch, "train")
        module._step(batch, "val")
    names = ("loss", "nats_per_code", "bits_per_image")
    assert (
        logged["bottom"] == logged["plain"] == {f"{s}/{k}" for s in ("train", "val") for k in names}
    )


def test_bottom_step_equals_log_prob_with_the_upsampled_top_vectors() -> None:
    module = bottom_module()
    bottom, y, top = bottom_batch(4)
    spatial = upsample_top_codes(module.top_embed, top, (4, 6))
    want = -module.model.log_prob(bottom, y, spatial_cond=spatial).mean() / 24
    torch.testing.assert_close(module._step((bottom, y, top), "val"), want)


def test_upsample_top_codes_is_the_repeated_codebook_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(K, D, generator=gen)
    top = torch.randint(K, (2, 2, 3), generator=gen)
    got = upsample_top_codes(embed, top, (6, 6))  # cells of 3 x 2
    assert got.shape == (2, D, 6, 6)
    brute = torch.empty(2, D, 6, 6)
    for b in range(2):
        for r in range(6):
            for c in range(6):
                brute[b, :, r, c] = embed[top[b, r // 3, c // 2]]
    assert torch.equal(got, brute)
    repeated = embed[top].repeat_interleave(3, dim=1).repeat_interleave(2, dim=2)  # [b, h, w, d]
    assert torch.equal(got, repeated.permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("top", "grid", "match"),
    [
        (
            torch.full((1, 2, 3), K),
            (4, 6),
            rf"top codes must lie in \[0, {K}\), got .*\[{K}, {K}\]",
        ),
        (torch.full((1, 2, 3), -1), (4, 6), rf"top codes must lie in \[0, {K}\)"),
        (
            torch.zeros(1, 2, 3, dtype=torch.long),
            (5, 6),
            "5x6 is not a multiple of the top grid 2x3",
        ),
        (torch.zeros(1, 2, 3), (4, 6), "top codes must be integers"),
        (torch.zeros(2, 3, dtype=torch.long), (4, 6), "top codes must be integers"),
    ],
)
def test_upsample_top_codes_refuses_bad_input_in_one_line(
    top: torch.Tensor, grid: tuple[int, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as err:
        upsample_top_codes(torch.zeros(K, D), top, grid)
    assert "\n" not in str(err.value)


def _no_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a value reaches the host raises."""

    def sync(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync in a training step")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_training_steps_make_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    bottom = bottom_module()
    plain = PriorModule(dict(BOTTOM, spatial_cond_channels=0), TRAIN)
    pixels = PriorModule(dict(data="pixels", in_channels=1, height=4, width=4, channels=8,
                              num_layers=2, num_classes=2, class_dropout=0.3), TRAIN)  # fmt: skip
    pixels.log_dict = plain.log_dict = bottom.log_dict
    images = torch.rand(4, 1, 4, 4) * 2 - 1
    batches = ((bottom, bottom_batch(4)), (plain, bottom_batch(4)[:2]),
               (pixels, (images, torch.tensor([0, 1, 0, 1]))))  # fmt: skip
    for step in range(2):  # step 0 warms the masked convolutions' one-time cached mask test
        if step:
            _no_sync(monkeypatch)
        for module, batch in batches:
            module.training_step(batch, 0).backward()
            with torch.no_grad():
                module.validation_step(batch, 0)
    with pytest.raises(AssertionError, match="host sync"):  # public calls check values
        plain.model.log_prob(*bottom_batch(4)[:2])
