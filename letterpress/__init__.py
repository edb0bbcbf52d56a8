"""letterpress: run, serve and fine-tune block-diffusion language models (DiffusionGemma).

    from letterpress import LLM, SamplingParams

The names below load on first use (PEP 562), so `import letterpress` and the command line's `--help` import
no torch; `from letterpress import LLM` loads the engine as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
