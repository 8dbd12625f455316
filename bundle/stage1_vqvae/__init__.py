"""Stage 1: the VQ-VAE, its codebook health and its export forms."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
