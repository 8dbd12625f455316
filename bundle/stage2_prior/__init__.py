"""Stage 2: the autoregressive prior over code maps, the code cache, sampling and generation."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
