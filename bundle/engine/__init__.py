"""Engine pieces shared by both stages: checkpoints, guards, inferers, compilation, file writes and run records."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
