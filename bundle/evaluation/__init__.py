"""Evaluation: metrics over images, features and codes, and the handlers that write them."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
