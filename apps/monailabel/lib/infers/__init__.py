from .generate import GenerateInfer
from .reconstruct import ReconstructInfer

__all__ = ["GenerateInfer", "ReconstructInfer"]
