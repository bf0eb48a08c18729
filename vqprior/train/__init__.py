"""The training layer (Lightning + the stage functions); ``import vqprior`` does not load it."""

from vqprior.train.codes import encode_codes
from vqprior.train.config import DeviceOptions, PriorStageConfig, TrainConfig, VAEStageConfig
from vqprior.train.inference import evaluate, export, generate
from vqprior.train.stages import train_prior, train_vae

__all__ = [
    "DeviceOptions",
    "PriorStageConfig",
    "TrainConfig",
    "VAEStageConfig",
    "encode_codes",
    "evaluate",
    "export",
    "generate",
    "train_prior",
    "train_vae",
]
