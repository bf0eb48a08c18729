"""Models: the VQ-VAE (one or more levels), the PixelCNN prior and the chain of level priors.

Importing the package registers the two-level VQ-VAE (``VQVAE(VQVAEConfig(levels=2))``).
"""

from vqprior.models import hierarchy as _hierarchy  # noqa: F401  (registers levels=2)
