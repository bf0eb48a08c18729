"""vqprior: VQ-VAE + PixelCNN priors.

``import vqprior`` imports neither lightning nor click; the training layer does.
"""

from vqprior.config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
__version__ = "0.1.0"
