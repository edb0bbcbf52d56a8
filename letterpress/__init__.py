"""letterpress: run, serve and fine-tune block-diffusion language models (DiffusionGemma).

    from letterpress import LLM, SamplingParams

The names below load on first use (PEP 562), so `import letterpress` and the command line's `--help` import
no torch; `from letterpress import LLM` loads the engine as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS = {"LLM": ".engine.llm", "SamplingParams": ".engine.request", "RequestOutput": ".engine.request",
            "DiffusionGemma": ".model", "LetterpressError": ".errors",
            "StructuredOutputsParams": ".structured"}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .engine.llm import LLM
    from .engine.request import RequestOutput, SamplingParams
    from .errors import LetterpressError
    from .model import DiffusionGemma
    from .structured import StructuredOutputsParams


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
