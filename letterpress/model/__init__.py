"""The DiffusionGemma model: `DiffusionGemma.from_pretrained(path_or_id)` with `encode` and `denoise`.

`DiffusionGemma` and `load_model` load on first use (PEP 562): the building blocks (`layers`, `moe`, `vision`)
sit below `letterpress.quant` and `letterpress.checkpoint`, which use them, while `diffusion_gemma` sits above
both (it loads checkpoints). Importing `letterpress.model.layers` must therefore not import `diffusion_gemma`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"DiffusionGemma": ".diffusion_gemma", "load_model": ".diffusion_gemma"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .diffusion_gemma import DiffusionGemma, load_model

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
