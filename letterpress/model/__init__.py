"""The DiffusionGemma model: `DiffusionGemma.from_pretrained(path_or_id)` with `encode` and `denoise`.

`DiffusionGemma`, `load_model` and `load_vision_model` load on first use (PEP 562): the building blocks
(`layers`, `moe`) sit below `letterpress.quant` and `letterpress.checkpoint`, which use them, while
`diffusion_gemma` and `vision` sit above both (they load checkpoints). Importing `letterpress.model.layers`
must therefore not import `diffusion_gemma` or `vision`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"DiffusionGemma": ".diffusion_gemma", "load_model": ".diffusion_gemma",
            "load_vision_model": ".vision"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .diffusion_gemma import DiffusionGemma, load_model
    from .vision import load_vision_model

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
