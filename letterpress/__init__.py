"""letterpress: run, serve and fine-tune block-diffusion language models (DiffusionGemma)."""

from .engine.llm import LLM
from .engine.request import RequestOutput, SamplingParams
from .errors import LetterpressError
from .model import DiffusionGemma

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "DiffusionGemma", "LetterpressError", "__version__"]
