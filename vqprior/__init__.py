"""vqprior: VQ-VAE + PixelCNN priors.

``import vqprior`` imports neither lightning nor click; the training layer does.
"""

from vqprior._version import __version__ as __version__
from vqprior.config import Config, ConfigError
from vqprior.host import keep_freed_memory
from vqprior.io import CheckpointError, load_pretrained
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig

__all__ = [
    "VQVAE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "PixelCNN",
    "PixelCNNConfig",
    "VQVAEConfig",
    "keep_freed_memory",
    "load_pretrained",
]
