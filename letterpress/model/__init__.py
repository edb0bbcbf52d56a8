"""The DiffusionGemma model: `DiffusionGemma.from_pretrained(path_or_id)` with `encode` and `denoise`.

`DiffusionGemma` and `load_model` load on first use (PEP 562): the building blocks (`layers`, `moe`, `vision`)
sit below `letterpress.quant` and `letterpress.checkpoint`, which use them, while `diffusion_gemma` sits above
both (it loads checkpoints). Importing `letterpress.model.layers` must therefore not import `diffusion_gemma`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"DiffusionGemma": ".diffusion_gemma", "load_model": ".diffusion_gemma"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .diffusion_gemma import DiffusionGemma, load_model


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
