"""Lets MONAI Label's ``BundleInferTask`` import in an environment without torchvision.

``monailabel/transform/post.py`` (imported by ``monailabel.tasks.infer.bundle``) does
``from torchvision.utils import make_grid, save_image`` at module level. Those two names are used only by
``DumpImagePrediction2Dd`` (a debugging transform of the DeepGrow/DeepEdit pathology apps), never by this
app: the reconstruction runs the bundle's own transforms plus ``Restored``/``Invertd``, and the generator
uses none of ``post.py``. PyPI has no CPU torchvision for the CPU torch 2.13 wheel (its build needs the CUDA
libtorch and fails with "operator torchvision::nms does not exist"), and the CUDA pair costs about 5.5 GB.

So, only when torchvision cannot be imported, :func:`import_bundle_infer_task` places a stand-in
``torchvision.utils`` in ``sys.modules`` for the duration of that one import and removes it straight after:
afterwards ``import torchvision`` fails as usual, so MONAI's ``optional_import("torchvision")`` and every
other library still see torchvision as absent. ``post.make_grid``/``post.save_image`` then raise a clear error
if anything ever calls them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision.utils")
        return True
    except Exception:  # absent, or a build that does not match torch (ImportError, RuntimeError, OSError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop what a failed import left behind
        return False


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "torchvision is not installed in this environment (scripts/setup_monailabel.sh leaves it out); "
        "MONAI Label's image-dump helpers that need it are not used by this app."
    )


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    package = types.ModuleType("torchvision")
    package.__path__ = []  # a package without __file__: MONAI's optional_import would treat it as absent
    utils = types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = _unavailable
    package.utils = utils
    sys.modules["torchvision"], sys.modules["torchvision.utils"] = package, utils
    try:
        yield
    finally:
        for name in ("torchvision.utils", "torchvision"):
            if sys.modules.get(name) in (package, utils):
                del sys.modules[name]


def import_bundle_infer_task() -> type:
    """``monailabel.tasks.infer.bundle.BundleInferTask``, importable with or without torchvision."""
    if "monailabel.transform.post" not in sys.modules and not _torchvision_importable():
        logger.info("torchvision not available: importing monailabel.transform.post with a stand-in torchvision.utils")
        with _torchvision_stand_in():
            importlib.import_module("monailabel.transform.post")
    from monailabel.tasks.infer.bundle import BundleInferTask

    return BundleInferTask
