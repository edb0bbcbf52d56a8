"""What a caller asks for (SamplingParams, Request) and what it gets back (RequestOutput)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..config import GenerationDefaults
from ..errors import RequestError
from ..sampling import Clamp, Draws

_ids = itertools.count()


@dataclass
class SamplingParams:
    """Per-request sampler settings. `None` means "the checkpoint's generation defaults"."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    seed: int | None = None
    eos_token_ids: list[int] | None = None
    ignore_eos: bool = False
    greedy: bool = False  # propose the argmax instead of sampling (the server's temperature 0)

    def resolve(self, defaults: GenerationDefaults) -> "SamplingParams":
        """Fill unset fields from the checkpoint's defaults and validate the result."""
        filled = replace(self)
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold"):
            if getattr(filled, name) is None:
                setattr(filled, name, getattr(defaults, name))
        if filled.eos_token_ids is None:
            filled.eos_token_ids = list(defaults.eos_token_ids)
        filled.validate()
        return filled

    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")

        positive_int("max_new_tokens")
        positive_int("max_denoising_steps")
        if not (isinstance(self.stability_threshold, int) and self.stability_threshold >= 0):
            raise RequestError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        for name in ("entropy_bound", "confidence_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise RequestError(f"{name} must be a number > 0, got {value!r}")
        if not (isinstance(self.t_min, (int, float)) and isinstance(self.t_max, (int, float))):
            raise RequestError("t_min and t_max must be numbers")
        if self.t_min < 0 or self.t_max <= self.t_min:
            raise RequestError(f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.greedy, bool):
            raise RequestError(f"greedy must be true or false, got {self.greedy!r}")


@dataclass
class CanvasEvent:
    """Sent to a request's listener: after each denoising step (`final=False`, the current argmax draft)
    and once per finished canvas (`final=True`, the committed tokens, already cut at EOS / max tokens)."""

    request_id: str
    canvas: int
    step: int
    token_ids: list[int]
    final: bool
    accepted: int = 0


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved
    draws: Draws
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    listener: Callable[[CanvasEvent], None] | None = None
    want_drafts: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    # infill / edit: clamps[k] pins known tokens in canvas k (None or past the end: a free canvas)
    clamps: list[Clamp | None] = field(default_factory=list)

    def clamp_for(self, canvas: int) -> Clamp | None:
        return self.clamps[canvas] if canvas < len(self.clamps) else None

    def check_clamps(self, canvas_length: int, vocab_size: int) -> None:
        for k, clamp in enumerate(self.clamps):
            if clamp is None:
                continue
            if clamp.tokens.shape != (canvas_length,) or clamp.mask.shape != (canvas_length,):
                raise RequestError(f"clamp of canvas {k} must have {canvas_length} positions (the canvas length)")
            if clamp.mask.dtype != torch.bool:
                raise RequestError(f"clamp of canvas {k}: the mask must be boolean")
            pinned = clamp.tokens[clamp.mask]
            if pinned.numel() and not (0 <= int(pinned.min()) and int(pinned.max()) < vocab_size):
                raise RequestError(f"clamp of canvas {k}: token ids must lie in [0, {vocab_size})")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, excluding the stop token
    finish_reason: str  # "stop" (an EOS id), "length" (max_new_tokens), "abort"
    canvases: int
    steps_per_canvas: list[int]
    decoder_passes: int
    tokens_per_forward: float  # the reference's definition: non-pad tokens through EOS / decoder passes
    seconds: float
    text: str | None = None
    # per canvas: mean entropy over its free positions at its last step (lower = the model is surer)
    final_entropy: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (vLLM's name)
