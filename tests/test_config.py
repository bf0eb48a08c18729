"""The strict config base: unknown keys, type coercion, YAML round trip, dotted overrides."""

from __future__ import annotations

import pytest

from vqprior import PixelCNNConfig, VQVAEConfig
from vqprior.config import ConfigError, apply_overrides


def test_unknown_key_is_an_error_that_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key chanels .*did you mean channels\?"):
        PixelCNNConfig.from_dict({"chanels": 3})


def test_yaml_strings_are_coerced_and_bad_types_rejected() -> None:
    cfg = VQVAEConfig.from_dict({"beta": "1e-1", "num_codes": 64.0, "restart_dead_codes": "false"})
    assert cfg.beta == 0.1 and cfg.num_codes == 64 and cfg.restart_dead_codes is False
    with pytest.raises(ConfigError, match="num_codes must be an integer"):
        VQVAEConfig.from_dict({"num_codes": "many"})
    with pytest.raises(ConfigError, match="beta must be a number"):
        VQVAEConfig.from_dict({"beta": [1]})


@pytest.mark.parametrize("cfg", [VQVAEConfig(), PixelCNNConfig(data="codes", num_classes=10)])
def test_yaml_round_trip(cfg) -> None:
    assert type(cfg).from_yaml(cfg.to_yaml()) == cfg


def test_dotted_overrides_parse_values_and_reject_bad_paths() -> None:
    data = {"model": {"channels": 8}, "train": {"lr": 1e-3}}
    out = apply_overrides(data, ["model.channels=64", "train.lr=3e-4", "vae=runs/v"])
    # PyYAML reads 3e-4 as a string; Config.from_dict coerces it to the annotated float
    assert out == {"model": {"channels": 64}, "train": {"lr": "3e-4"}, "vae": "runs/v"}
    assert data["model"]["channels"] == 8  # the input is not mutated
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(data, ["model.channels"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(data, ["train.lr.x=1"])
