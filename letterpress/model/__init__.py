"""The DiffusionGemma model: `DiffusionGemma.from_pretrained(path_or_id)` with `encode` and `denoise`."""

from .diffusion_gemma import DiffusionGemma

__all__ = ["DiffusionGemma"]
