"""What a caller asks for (SamplingParams, Request) and what it gets back (RequestOutput)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..config import GenerationDefaults
from ..errors import RequestError
from ..media.prompt import MediaRun
from ..sampling import Clamp, Draws
from ..structured import Constraint, StructuredOutputsParams
from .limits import SAMPLING_LIMITS, check_temperatures  # without torch: the CLI checks its flags with them

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
    top_k: int = 0  # keep the k most likely tokens per position (sampling.apply_top_k_); 0: all
    # vLLM's field: constrain the output to a JSON schema, regex or choice (letterpress.structured); a dict
    # with the same keys is taken too
    structured_outputs: StructuredOutputsParams | None = None

    def resolve(self, defaults: GenerationDefaults) -> "SamplingParams":
        """Fill unset fields from the checkpoint's defaults and validate the result."""
        filled = replace(self)
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold"):
            if getattr(filled, name) is None:
                setattr(filled, name, getattr(defaults, name))
        if filled.eos_token_ids is None:
            filled.eos_token_ids = list(defaults.eos_token_ids)
        if isinstance(filled.structured_outputs, dict):
            try:
                filled.structured_outputs = StructuredOutputsParams(**filled.structured_outputs)
            except TypeError as e:
                raise RequestError(f"structured_outputs: {e}") from None
        filled.validate()
        return filled

    def validate(self) -> None:
        """Every field finite and in a range the engine can honour, so that no request can make a batched
        step fail (a nan schedule, an int32 overflow, a step count that never ends)."""
        for name, check in SAMPLING_LIMITS.items():  # resolve() set every one of them but the seed
            if name != "seed" or self.seed is not None:
                check(getattr(self, name))
        check_temperatures(self.t_min, self.t_max)
        if not isinstance(self.eos_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_ids):
            raise RequestError(f"eos_token_ids must be a list of integers, got {self.eos_token_ids!r}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise RequestError("structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")
            if self.ignore_eos:
                raise RequestError("structured output cannot be combined with ignore_eos: the answer ends with EOS "
                                   "once it is complete")
            if self.top_k:
                raise RequestError("structured output (or tool_choice required / named) cannot be combined with "
                                   "top_k: the constraint chooses among every token the automaton allows")
        for name in ("greedy", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be true or false, got {getattr(self, name)!r}")


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
    # drafts: which positions this step accepted (kept their proposal; the others were re-noised)
    accepted_mask: list[bool] | None = None


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved
    draws: Draws
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    listener: Callable[[CanvasEvent], None] | None = None
    want_drafts: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    # time.perf_counter() after which the scheduler stops the row (finish_reason "timeout"); None: no deadline
    deadline: float | None = None
    # infill / edit: clamps[k] pins known tokens in canvas k (None or past the end: a free canvas)
    clamps: list[Clamp | None] = field(default_factory=list)
    # images and video frames in the prompt, in prompt order (letterpress.media.prompt.expand_prompt)
    media: list[MediaRun] = field(default_factory=list)
    # structured output: the automaton every committed canvas must follow (LLM.make_request builds it)
    constraint: Constraint | None = None

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
    # "stop" (an EOS id), "length" (max_new_tokens), "abort", "timeout" (its deadline passed; token_ids holds
    # the canvases committed before), "error" (this row failed in an engine step; see `error`)
    finish_reason: str
    canvases: int
    steps_per_canvas: list[int]
    decoder_passes: int
    tokens_per_forward: float  # the reference's definition: non-pad tokens through EOS / decoder passes
    seconds: float
    text: str | None = None
    # per canvas: mean entropy over its free positions at its last step (lower = the model is surer)
    final_entropy: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (vLLM's name)
    error: Exception | None = None  # why the row failed (finish_reason "error"); its batch-mates went on
