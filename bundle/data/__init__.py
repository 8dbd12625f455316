"""Data: discovery of slice folders, synthetic phantoms, and the transforms MONAI lacks."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
