"""The two-level VQ-VAE in the training layer: codes per level, the bottom prior's batches and
spatial condition, level checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vqprior.artifacts import load_codes
from vqprior.config import ConfigError
from vqprior.data import DataConfig, load_image_splits
from vqprior.io import CheckpointError
from vqprior.models.hierarchy import VQVAE2, level_quantizers, reconstruct
from vqprior.models.levels import upsample_codes
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.train.codes import encode_splits, level_codes, stored_codes
from vqprior.train.hierarchy import level_index, level_record, level_records
from vqprior.train.hierarchy_prior import BottomPriorModule, level_datamodule

TINY = dict(
    in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1, num_codes=16, code_dim=4
)
DATA = DataConfig(name="digits", limit=40, val_fraction=0.1, test_fraction=0.1)


def vae2() -> VQVAE2:
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.from_dict({**TINY, "levels": 2, "downsample": 2}))
    assert isinstance(model, VQVAE2)
    return model.eval()


def record() -> dict[str, Any]:
    return {"vae_hash": "h0", "vae_path": "/x", "num_codes": 16, "grid": [4, 4],
            "image_shape": [1, 8, 8]}  # fmt: skip


def test_levels_records_and_checks() -> None:
    model, one = vae2(), VQVAE(VQVAEConfig.from_dict(TINY))
    assert level_record(record(), model, "top")["grid"] == [2, 2]
    assert level_record(record(), model, "bottom")["grid"] == [4, 4]
    assert level_record(record(), one, None) == record()
    assert [r["grid"] for r in level_records(record(), model)] == [[2, 2], [4, 4]]
    assert level_records(record(), one) == (record(),)
    assert [level_index(model, "top"), level_index(model, "bottom")] == [0, 1]
    assert level_index(one, None) == 0
    with pytest.raises(ConfigError, match="data.level=top or data.level=bottom"):
        level_index(model, None)
    with pytest.raises(ConfigError, match="needs a two-level VAE"):
        level_index(one, "top")
    with pytest.raises(ConfigError, match="level"):
        DataConfig(level="middle")
    assert set(level_quantizers(model)) == {"top", "bottom"}
    assert set(level_quantizers(one)) == {""}
    x = torch.zeros(2, 1, 8, 8)
    assert torch.equal(reconstruct(model, x), model.decode_levels(*model.encode_levels(x)))


def test_encoded_levels_are_stored_and_found_again(tmp_path: Path) -> None:
    model, splits = vae2(), load_image_splits(DATA)
    level_data = DataConfig(**{**DATA.to_dict(), "level": "bottom"})
    written = encode_splits(model, record(), splits, level_data, tmp_path / "codes")
    for split in ("train", "val", "test"):
        x = torch.stack([getattr(splits, split)[i][0] for i in range(3)])
        top, bottom = model.encode_levels(x)
        assert torch.equal(written[0][split][0][:3], top)
        assert torch.equal(written[1][split][0][:3], bottom)
        _, _, meta = load_codes(tmp_path / "codes" / "top" / f"{split}.safetensors")
        assert (meta["level"], meta["grid"]) == ("top", "2x2")
        _, _, meta = load_codes(tmp_path / "codes" / f"{split}.safetensors")  # as one level
        assert (meta["level"], meta["grid"]) == ("bottom", "4x4")
    # stored codes are read back (the data's level does not matter: both levels share them)
    top_data = DataConfig(**{**DATA.to_dict(), "level": "top"})
    found = level_codes(model, record(), splits, top_data, tmp_path, tmp_path / "codes", "cpu")
    for i in range(2):
        assert torch.equal(found[i]["train"][0], written[i]["train"][0])
    other = {**record(), "vae_hash": "h1"}
    with pytest.raises(CheckpointError, match="different VAE"):
        level_codes(model, other, splits, top_data, tmp_path, tmp_path / "codes", "cpu")


@pytest.mark.parametrize("levels", [1, 2])
def test_one_encode_path_reuses_valid_codes_and_reencodes_stale_ones(
    tmp_path: Path, levels: int
) -> None:
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.from_dict({**TINY, "levels": levels, "downsample": 2})).eval()
    splits, cache = load_image_splits(DATA), tmp_path / "codes"
    first = level_codes(model, record(), splits, DATA, tmp_path, None, "cpu")  # encoded now
    assert [tuple(c["train"][0].shape[1:]) for c in first] == model.level_shapes(8, 8)
    finest, _, _ = load_codes(cache / "train.safetensors")  # the finest level where one goes
    assert torch.equal(finest, first[-1]["train"][0])
    again = stored_codes(model, record(), DATA, cache, strict=False)
    assert again is not None and torch.equal(again[0]["val"][0], first[0]["val"][0])
    other = {**record(), "vae_hash": "h1"}  # another VAE: the cache is stale, encoded again
    assert stored_codes(model, other, DATA, cache, strict=False) is None
    level_codes(model, other, splits, DATA, tmp_path, None, "cpu")
    files = [cache / "train.safetensors", *([cache / "top" / "train.safetensors"] * (levels - 1))]
    assert {load_codes(f)[2]["vae_hash"] for f in files} == {"h1"}


def test_bottom_batches_pair_each_bottom_map_with_its_top_map(tmp_path: Path) -> None:
    model, splits = vae2(), load_image_splits(DATA)
    codes = encode_splits(model, record(), splits, DATA, tmp_path / "codes")
    dm, has_val = level_datamodule(codes, 1, 4, 0, 0)
    assert has_val
    bottom, y, top = next(iter(dm.val_dataloader()))
    assert bottom.shape == (4, 4, 4) and top.shape == (4, 2, 2) and y.shape == (4,)
    assert torch.equal(bottom, codes[1]["val"][0][:4])
    assert torch.equal(top, codes[0]["val"][0][:4])
    top_dm, _ = level_datamodule(codes, 0, 4, 0, 0)
    assert next(iter(top_dm.val_dataloader()))[0].shape == (4, 2, 2)


def test_bottom_prior_module_uses_top_condition_and_learns_from_it() -> None:
    model = vae2()
    with torch.no_grad():
        model.quantizer_top.embed.copy_(torch.randn(16, 4))
    prior_cfg = dict(data="codes", num_codes=16, height=4, width=4, channels=8, num_layers=2,
                     spatial_cond_channels=4)  # fmt: skip
    train = {"max_steps": 1, "ema_decay": 0.0}
    module = BottomPriorModule(prior_cfg, train, top_embed=model.quantizer_top.embed)
    top, bottom = torch.randint(0, 16, (3, 2, 2)), torch.randint(0, 16, (3, 4, 4))
    batch = (bottom, torch.zeros(3, dtype=torch.long), top)
    spatial = upsample_codes(model.quantizer_top.embed, top, (4, 4))
    torch.testing.assert_close(module._inputs(batch)[2], spatial)
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer here
    loss = module._step(batch, "val")
    want = -module.model.log_prob(bottom, spatial_cond=spatial).mean() / 16
    torch.testing.assert_close(loss, want)
    module.fixed_top = top
    assert module.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        BottomPriorModule(prior_cfg, train, top_embed=torch.zeros(16, 3))
