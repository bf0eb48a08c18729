"""The training layer: Lightning modules and the stage functions.

``import vqprior`` does not load it, and importing this package is cheap: the names below
are imported on first use (the stages pull in Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceOptions": "vqprior.train.config",
    "PriorStageConfig": "vqprior.train.config",
    "TrainConfig": "vqprior.train.config",
    "VAEStageConfig": "vqprior.train.config",
    "encode_codes": "vqprior.train.codes",
    "evaluate": "vqprior.train.inference",
    "export": "vqprior.train.inference",
    "generate": "vqprior.train.inference",
    "train_prior": "vqprior.train.stages",
    "train_vae": "vqprior.train.stages",
    "NonFiniteLossError": "vqprior.train.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqprior.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
