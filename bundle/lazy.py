"""Import a package's sub-modules on first attribute access (PEP 562)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module-level ``__getattr__`` for ``package`` that imports ``package.<name>`` when first asked for it.

    Args:
        package: the package's ``__name__``.

    Returns:
        The ``__getattr__`` function; it raises ``AttributeError`` for names that are not sub-modules.
    """

    def __getattr__(name: str) -> ModuleType:  # noqa: N807
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module '{package}' has no attribute or sub-module '{name}'") from error

    return __getattr__
