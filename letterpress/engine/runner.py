"""The runner: one engine step for every active row.

    encode   rows with pending context (prompt chunks, just-finished canvases) -> KV cache
    denoise  every active canvas in one batched call                          -> logits [R, C, V]
    sample   proposals, argmax, entropy, acceptance                           -> next canvases, done flags

Rows are independent: each has its own row of block tables in the paged KV cache (blocks shared through
prefix caching are never written again), step counter and random draws, so a row's output does
not depend on which other rows share its batch. A row may carry a clamp for its current canvas (infill,
edit): the sampler pins those positions (`sampling.Clamp`); clamped and free rows share one denoise call.
A row may carry a structured-output constraint (`letterpress.structured`): after the sampler step its
committed canvas and kept proposals are replaced by the automaton's DP paths, and its acceptance and
stopping read the entropy over the allowed tokens (`_constrain`); rows without one take exactly the
unconstrained path.

Faults stay in their row. The batched part of each phase (the model call, and for denoise the sampler) is
run by `_isolated`: when it raises, the row state it touched (random generators, cache lengths) is put
back and the two halves of the batch are run again separately, down to single rows; a row that fails alone
gets finish_reason "error" and the exception, and every other row's step is exactly what it would be in a
smaller batch, with the same draws. Rows whose logits are not finite are picked out without bisecting
(`sampling.NonFiniteRows`). The per-row bookkeeping after the batched part (commit, listener events) runs
row by row, so an exception there (a listener that raises) also fails only its row.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, TypeVar

import torch

from ..config import IMAGE_TIERS
from ..errors import RequestError
from ..model import DiffusionGemma
from ..fast_sampling import fused_denoise_step
from ..sampling import (Clamp, NonFiniteRows, StepOutcome, denoise_step, entropy_bound_accept, stack_clamps,
                        temperature)
from .request import CanvasEvent, Request, RequestOutput

log = logging.getLogger("letterpress.engine")
MAX_MEDIA_RUN = max(IMAGE_TIERS)  # the most soft tokens one image takes
T = TypeVar("T")


@dataclass
class Row:
    request: Request
    slot: int
    pending: list[int]  # context tokens not yet encoded
    canvas: torch.Tensor | None = None  # [C] current (noisy) canvas; None while encoding
    argmax: torch.Tensor | None = None  # [C] the canvas this row commits if it stops now
    sc_logits: torch.Tensor | None = None  # [C, V] previous step's processed logits
    history: list[torch.Tensor] = field(default_factory=list)  # last `stability_threshold` argmax canvases
    clamp: Clamp | None = None  # the current canvas's pinned positions (on the model's device)
    mean_entropy: float = 0.0  # free positions, last step
    final_entropy: list[float] = field(default_factory=list)  # per finished canvas
    step: int = 0
    canvas_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    steps_per_canvas: list[int] = field(default_factory=list)
    valid_tokens: int = 0  # for tokens/forward: non-pad tokens through the stop token
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not encoded)
    error: Exception | None = None  # finish_reason "error": what failed
    # soft tokens of the prompt's media runs still to encode ([length, hidden] each), computed once
    media_embeds: dict[int, torch.Tensor] | None = None

    @property
    def prompt_offset(self) -> int | None:
        """Prompt position of `pending[0]` while the prompt is being encoded, else None."""
        return len(self.request.prompt_token_ids) - len(self.pending) if self.canvas_index == 0 else None

    @property
    def denoising(self) -> bool:
        return self.canvas is not None and self.finish_reason is None

    def output(self) -> RequestOutput:
        passes = sum(self.steps_per_canvas)
        return RequestOutput(
            request_id=self.request.request_id,
            prompt_token_ids=self.request.prompt_token_ids,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason or "abort",
            canvases=len(self.steps_per_canvas),
            steps_per_canvas=self.steps_per_canvas,
            decoder_passes=passes,
            tokens_per_forward=self.valid_tokens / passes if passes else 0.0,
            seconds=time.perf_counter() - self.request.arrival,
            final_entropy=self.final_entropy,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
        )


class Runner:
    def __init__(self, model: DiffusionGemma, num_slots: int, max_model_len: int, prefill_chunk: int = 2048,
                 pad_token_id: int = 0, impl: str = "plain", block_size: int = 16, kv_cache_bytes: int | None = None,
                 enable_prefix_caching: bool = True, vision=None):
        self.model = model
        self.vision = vision  # letterpress.model.vision.VisionModel, or None for a text-only model
        # "fast": the fused sampler pass, whose softmax also feeds the next step's self-conditioning
        # (rows then keep probabilities, not logits, in `sc_logits`); the model's own fast paths are switched
        # on the model (`letterpress.model.fast.apply_fast_path`)
        self.fast = impl == "fast"
        # paged: rows are admitted by free blocks (Scheduler), `kv_cache_bytes` None sizes the pool for
        # num_slots rows of max_model_len tokens (letterpress.cache.plan_pool)
        # an image is encoded in one chunk, even one longer than `prefill_chunk` (up to the largest tier)
        self.max_chunk = max(prefill_chunk, MAX_MEDIA_RUN) if vision is not None else prefill_chunk
        self.cache = model.new_paged_cache(num_slots, max_model_len, block_size, budget_bytes=kv_cache_bytes,
                                           prefill_chunk=self.max_chunk, enable_prefix_caching=enable_prefix_caching)
        self.canvas_length = model.config.canvas_length
        self.vocab_size = model.text_config.vocab_size
        self.prefill_chunk = prefill_chunk
        self.pad_token_id = pad_token_id
        self.decoder_passes = 0  # batched denoise calls, for metrics
        self.weights_version = getattr(model, "weights_version", 0)

    def forget_stale_prefixes(self) -> None:
        """Drop the prefix cache when the model's weights changed in place since it was filled (an adapter loaded
        into `llm.model`, `quantize_model`): keys and values of the old weights must not answer a new prompt."""
        version = getattr(self.model, "weights_version", 0)
        if version != self.weights_version:
            self.cache.reset_prefix_cache()
            self.weights_version = version

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> None:
        encoding = [r for r in rows if r.pending and r.finish_reason is None]
        if encoding:
            self._encode(encoding)
        denoising = [r for r in rows if r.denoising]
        if denoising:
            self._denoise(denoising)

    # ------------------------------------------------------------------------------------------------ encode
    def _encode(self, rows: list[Row]) -> None:
        for row in rows:
            if row.request.media and row.media_embeds is None:
                with self._row_guard(row):
                    row.media_embeds = self._media_features(row)
        rows = [r for r in rows if r.finish_reason is None]
        if not rows:
            return
        for part, chunks in self._isolated(self._encode_batch, rows):
            for row, chunk in zip(part, chunks):
                with self._row_guard(row):
                    row.pending = row.pending[len(chunk):]
                    if not row.pending:
                        row.media_embeds = None  # the prompt is in the cache: the features are not needed again
                        self._start_canvas(row)

    def _media_features(self, row: Row) -> dict[int, torch.Tensor]:
        """Soft tokens of every media run of the row's prompt not already in the prefix cache, one image at a
        time (unpadded: a row's features do not depend on its batch-mates). Runs once per request."""
        out = {}
        for i, run in enumerate(row.request.media):
            if run.end <= row.num_cached_tokens:
                continue
            if run.embeds is not None:
                out[i] = run.embeds.to(self.model.device, self.model.dtype)
                continue
            if self.vision is None:
                raise RequestError("this model has no vision tower: it cannot take images")
            device = self.vision.vision_tower.inv_freq.device
            (embeds,) = self.vision.embed_images([(run.pixel_values.to(device), run.positions.to(device))])
            if embeds.shape[0] != run.length:
                raise RequestError(f"an image gives {embeds.shape[0]} soft tokens but its prompt holds {run.length}")
            out[i] = embeds.to(self.model.device, self.model.dtype)
        return out

    def _chunk(self, row: Row) -> list[int]:
        """The row's next chunk: `prefill_chunk` tokens, cut before an image run it would split (or, for a run
        that starts the chunk and is longer, extended to its end: a run is encoded in one piece)."""
        n = min(len(row.pending), self.prefill_chunk)
        offset = row.prompt_offset
        if row.request.media and offset is not None:
            end = offset + n
            for run in row.request.media:
                if run.start < end < run.end:
                    end = run.start if run.start > offset else run.end
            n = end - offset
        return row.pending[:n]

    def _encode_batch(self, rows: list[Row]) -> list[list[int]]:
        """Write the next prompt chunk of each row to the cache; returns the chunks."""
        chunks = [self._chunk(r) for r in rows]
        device = self.model.device
        width = max(len(c) for c in chunks)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        lengths = torch.tensor([len(c) for c in chunks], device=device)
        slots = torch.tensor([r.slot for r in rows], device=device)
        soft_tokens, soft_mask = self._chunk_media(rows, chunks, width)
        self.model.encode(ids.to(device), self.cache, slots, lengths, soft_tokens=soft_tokens,
                          soft_token_mask=soft_mask)
        return chunks

    def _chunk_media(self, rows: list[Row], chunks: list[list[int]], width: int):
        """(soft tokens [M, hidden] in row-major order, mask [R, width]) of the media runs inside the chunks, or
        (None, None) when they hold none."""
        if not any(r.request.media for r in rows):
            return None, None
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        embeds = []
        for i, (row, chunk) in enumerate(zip(rows, chunks)):
            offset = row.prompt_offset
            if offset is None or not row.request.media:
                continue
            for j, run in enumerate(row.request.media):
                if offset <= run.start and run.end <= offset + len(chunk):
                    mask[i, run.start - offset:run.end - offset] = True
                    embeds.append(row.media_embeds[j])
        if not embeds:
            return None, None
        return torch.cat(embeds), mask.to(self.model.device)

    def _start_canvas(self, row: Row) -> None:
        row.canvas = row.request.draws.initial_canvas(self.canvas_length, self.vocab_size, row.canvas_index)
        row.canvas = row.canvas.to(self.model.device)
        clamp = row.request.clamp_for(row.canvas_index)
        row.clamp = None if clamp is None else clamp.to(self.model.device)
        if row.clamp is not None:
            row.canvas = row.clamp.apply(row.canvas)
        row.argmax = row.canvas
        row.sc_logits = None
        row.history = []
        row.step = 0

    # ----------------------------------------------------------------------------------------------- denoise
    def _denoise(self, rows: list[Row]) -> None:
        for part, outcome in self._isolated(self._denoise_batch, rows):
            for i, row in enumerate(part):
                with self._row_guard(row):
                    self._advance(row, outcome, i)

    def _denoise_batch(self, rows: list[Row]) -> StepOutcome:
        """One decoder pass and one sampler step for these rows; changes nothing but their draws."""
        device = self.model.device
        canvases = torch.stack([r.canvas for r in rows])
        slots = torch.tensor([r.slot for r in rows], device=device)
        sc_logits, sc_mask = self._self_conditioning(rows)
        parallel = getattr(self.model, "parallel_driver", None)  # tensor parallel: letterpress.parallel
        if parallel is not None:  # every rank keeps its vocabulary slice of the rows' state, by these keys
            parallel.prepare([(r.slot, r.canvas_index, r.step) for r in rows])
        if self.fast:
            logits = self.model.denoise(canvases, self.cache, slots, None, sc_mask, self_conditioning_probs=sc_logits)
        else:
            logits = self.model.denoise(canvases, self.cache, slots, sc_logits, sc_mask)
        self.decoder_passes += 1
        # the rows keep the previous state until the step succeeds (a retry in `_isolated` reads it again)
        del sc_logits

        params = [r.request.params for r in rows]
        temps = torch.tensor([temperature(r.step, p.max_denoising_steps, p.t_min, p.t_max) for r, p in zip(rows, params)],
                             dtype=torch.float32)
        bounds = torch.tensor([p.entropy_bound for p in params], dtype=torch.float32)
        # the logits are handed over: divided in place; keep_processed=False: the fused step may also reuse
        # them as its sampling scratch
        step = (partial(fused_denoise_step, sc_dtype=self.model.dtype, keep_processed=False) if self.fast
                else partial(denoise_step, in_place=True))
        clamp_tokens, clamp_mask = stack_clamps([r.clamp for r in rows], self.canvas_length, device)
        constrained = [i for i, r in enumerate(rows) if r.request.constraint is not None]
        top_k = [p.top_k for p in params] if any(p.top_k for p in params) else None
        args = (temps, bounds, [r.request.draws for r in rows], [r.canvas_index for r in rows], [r.step for r in rows],
                [p.greedy for p in params])
        if parallel is not None:  # the sampler's vocabulary passes on every rank's slice of the logits
            outcome = parallel.sample(logits, *args, clamp_tokens=clamp_tokens, clamp_mask=clamp_mask, top_k=top_k,
                                      keep_probs=self.fast, log_prob_rows=constrained)
            logps = outcome.log_probs
        else:
            # structured rows: their log-probabilities, taken before the step consumes (divides) the logits
            logps = {i: torch.log_softmax(logits[i].float() / temps[i], dim=-1) for i in constrained}
            outcome = step(logits, *args, clamp_tokens=clamp_tokens, clamp_mask=clamp_mask, top_k=top_k)
        if not self.fast:  # one [R, C, V] state whose rows the rows keep: next step reads it back without a copy
            outcome.processed_logits = outcome.processed_logits.to(self.model.dtype)
        for i, logp in logps.items():
            self._constrain(rows[i], outcome, i, logp)
        return outcome

    def _constrain(self, row: Row, outcome: StepOutcome, i: int, logp: torch.Tensor) -> None:
        """Row i's committed canvas and kept proposals from the automaton's DP (letterpress.structured):
        the canvas it commits is always a valid prefix that can still complete."""
        p = row.request.params
        constraint = row.request.constraint
        best, proposals, entropy = constraint.paths(logp, p.max_new_tokens - len(row.token_ids), row.canvas_index,
                                                    row.step, p.greedy)
        # acceptance and stopping read the constrained distribution (entropy over the allowed tokens along
        # the committed path): the model's own entropy counts tokens the automaton forbids
        accept = entropy_bound_accept(entropy[None], p.entropy_bound)[0]
        rejected = outcome.accept_mask[i] & ~accept  # kept by the unconstrained bound: needs noise now
        next_canvas = outcome.next_canvas[i]
        if bool(rejected.any()):
            noise = constraint.noise(self.canvas_length, self.vocab_size, row.canvas_index, row.step)
            next_canvas = torch.where(rejected, noise.to(next_canvas.device), next_canvas)
        outcome.argmax[i] = best
        outcome.next_canvas[i] = torch.where(accept, proposals, next_canvas)
        outcome.accept_mask[i] = accept
        outcome.mean_entropy[i] = entropy.mean()

    def _advance(self, row: Row, outcome: StepOutcome, i: int) -> None:
        """Row i of a sampler step: take its next canvas, report the draft, finish the canvas when it is done."""
        p = row.request.params
        argmax = outcome.argmax[i]
        k = p.stability_threshold
        # Stable: the argmax canvas equals each of the previous k ones (so never at the first step).
        stable = k == 0 or (len(row.history) == k and all(torch.equal(h, argmax) for h in row.history))
        row.history = (row.history + [argmax])[-k:] if k else []
        row.mean_entropy = float(outcome.mean_entropy[i])  # free positions only (clamps are certain)
        confident = bool(outcome.mean_entropy[i] < p.confidence_threshold)  # float32 compare, as before
        row.argmax, row.canvas = argmax, outcome.next_canvas[i]
        row.sc_logits = outcome.sc_probs[i] if self.fast else outcome.processed_logits[i].to(self.model.dtype)
        row.step += 1
        if row.request.want_drafts and row.request.listener:
            accepted = outcome.accept_mask[i]
            row.request.listener(CanvasEvent(row.request.request_id, row.canvas_index, row.step, argmax.tolist(),
                                             final=False, accepted=int(accepted.sum()), accepted_mask=accepted.tolist()))
        if (stable and confident) or row.step >= p.max_denoising_steps:
            self._finish_canvas(row)

    # ------------------------------------------------------------------------------------------------ faults
    def _isolated(self, run: Callable[[list[Row]], T], rows: list[Row]) -> list[tuple[list[Row], T]]:
        """`run(rows)`, or, when it raises, `run` on parts of `rows` without the rows that fail alone (which
        get finish_reason "error"). Returns (part, result) for every part that ran; their rows, in order, are
        `rows` less the failed ones. Before each retry the draws and cache lengths of the rows are restored,
        so a retried row draws the same numbers and writes the same cache positions as in the first try."""
        states = [_draw_state(r) for r in rows]
        lengths = self.cache.lengths.clone()
        try:
            return [(rows, run(rows))]
        except Exception as e:
            for row, state in zip(rows, states):
                _restore_draws(row, state)
            self.cache.lengths.copy_(lengths)
            if len(rows) == 1:
                self._fail(rows[0], e)
                return []
            if isinstance(e, NonFiniteRows):  # the sampler named the rows: no need to bisect
                for i in e.rows:
                    self._fail(rows[i], e)
                rest = [r for i, r in enumerate(rows) if i not in e.rows]
                return self._isolated(run, rest) if rest else []
            half = len(rows) // 2
            return self._isolated(run, rows[:half]) + self._isolated(run, rows[half:])

    @contextmanager
    def _row_guard(self, row: Row) -> Iterator[None]:
        """An exception inside fails `row` only."""
        try:
            yield
        except Exception as e:
            self._fail(row, e)

    def _fail(self, row: Row, error: Exception) -> None:
        log.error("request %s failed in an engine step (its batch-mates go on): %s: %s", row.request.request_id,
                  type(error).__name__, error, exc_info=error)
        row.finish_reason, row.error = "error", error
        row.canvas, row.sc_logits, row.history, row.pending = None, None, [], []

    def _self_conditioning(self, rows: list[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stack the previous step's logits; rows at their first step get a zero signal through the mask."""
        present = [r.sc_logits is not None for r in rows]
        if not any(present):
            return None, None
        template = next(r.sc_logits for r in rows if r.sc_logits is not None)
        stacked = _rows_of_one_tensor([r.sc_logits for r in rows])  # the last step's batch: no [R, C, V] copy
        if stacked is None:
            stacked = torch.stack([r.sc_logits if r.sc_logits is not None else torch.zeros_like(template) for r in rows])
        return stacked, torch.tensor(present, device=stacked.device)

    def _finish_canvas(self, row: Row) -> None:
        p = row.request.params
        tokens = row.argmax.tolist()
        budget = p.max_new_tokens - len(row.token_ids)
        eos = set() if p.ignore_eos else set(p.eos_token_ids)
        stop_at = next((i for i, t in enumerate(tokens) if t in eos), None)
        if stop_at is not None and stop_at < budget:
            committed, counted, reason = tokens[:stop_at], tokens[: stop_at + 1], "stop"
        elif budget <= len(tokens):
            committed, counted, reason = tokens[:budget], tokens[:budget], "length"
        else:
            committed, counted, reason = tokens, tokens, None
        if row.request.constraint is not None and reason is None:
            row.request.constraint.commit(committed)  # the next canvas continues from here
        row.token_ids.extend(committed)
        # tokens/forward counts what the model wrote: clamped positions were given, not generated
        free = [True] * len(counted) if row.clamp is None else (~row.clamp.mask).tolist()
        row.valid_tokens += sum(t != self.pad_token_id and f for t, f in zip(counted, free))
        row.steps_per_canvas.append(row.step)
        row.final_entropy.append(row.mean_entropy)
        if row.request.listener:
            row.request.listener(CanvasEvent(row.request.request_id, row.canvas_index, row.step, committed, final=True))
        row.canvas, row.sc_logits, row.history, row.clamp = None, None, [], None
        row.canvas_index += 1
        if reason is None:
            row.pending = tokens  # the canvas joins the context before the next one starts
        else:
            row.finish_reason = reason


def _draw_state(row: Row):
    get_state = getattr(row.request.draws, "get_state", None)
    return get_state() if get_state is not None else None


def _restore_draws(row: Row, state) -> None:
    if state is not None:
        row.request.draws.set_state(state)


def _rows_of_one_tensor(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """A [R, ...] view of the storage whose consecutive rows are exactly `tensors` (the previous step's
    batch, same rows in the same order), else None. (Storage offsets, not `_base`: inference-mode views
    have no `_base`.)"""
    first = tensors[0]
    if first is None or not first.is_contiguous():
        return None
    storage, n = first.untyped_storage().data_ptr(), first.numel()
    for i, t in enumerate(tensors):
        if (t is None or t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != first.storage_offset() + i * n):
            return None
    return first.as_strided((len(tensors), *first.shape), (n, *first.stride()), first.storage_offset())
