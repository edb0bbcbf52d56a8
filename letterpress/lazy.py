"""Names a package loads on first use (PEP 562), for the `__init__` of `letterpress`, `letterpress.model` and
`letterpress.train`: importing the package imports no module behind those names (and so no torch), and
`from package import Name` loads the one module that defines Name.

    __getattr__, __dir__ = lazy_exports(__name__, {"Name": ".module"}, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> tuple[
        Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`; `exports`: public name -> the module (relative
    to the package) that defines it; `namespace`: the package's globals()."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
