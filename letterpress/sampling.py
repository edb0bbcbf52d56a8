"""The denoising sampler: temperature schedule, proposals, entropy-bound acceptance, re-noising, stopping.

Pure functions over tensors plus the `Draws` interface that supplies every random number. Nothing here
knows about the model. Shapes: R rows, C canvas positions, V vocabulary.

Clamps (infilling, editing): a row's canvas may pin known tokens at some positions (`Clamp`). A clamped
position starts as its token, is never re-noised, never takes a proposal, reports its token in the argmax
canvas, and is left out of the entropy-bound ranking and of the mean entropy the stopping rule reads. The
model was trained with uniform-state corruption (each position kept with probability 1 - t), so a canvas
whose known positions never change is in its training distribution, as in image inpainting.

Memory: at the released vocabulary (262,144) one [C, V] float32 tensor is 268 MB per row at C = 256, so the
entropy and the sampling softmax run a chunk of positions at a time (letterpress/chunks.py), one row at a
time; chunking changes no bit. benchmarks/memory.py measures the step's peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .chunks import position_slices


class Draws(Protocol):
    """Where a row's randomness comes from. The engine asks in a fixed order per row; tests replay the
    reference's draws by (canvas, step) instead of by order, since the reference also draws for rows that
    already stopped."""

    def initial_canvas(self, length: int, vocab_size: int, canvas: int) -> torch.Tensor: ...

    def proposals(self, probs: torch.Tensor, canvas: int, step: int) -> torch.Tensor: ...

    def noise(self, length: int, vocab_size: int, canvas: int, step: int) -> torch.Tensor: ...

    # Optional: `get_state()` / `set_state(state)`. A stateful source (one that draws in order) has them, so
    # that the engine can undo the draws of a step it retries without a failed row (runner, "faults").


class NonFiniteRows(RuntimeError):
    """Some rows' logits (after the temperature) hold nan or inf, so they cannot be sampled. Raised before
    any row draws proposals or noise; `rows` are indices into the batch."""

    def __init__(self, rows: list[int]):
        super().__init__("the model's logits for this request are not finite (nan or inf), so there is "
                         "nothing to sample from")
        self.rows = rows


def check_finite(entropy: torch.Tensor) -> None:
    """entropy [R, C]: a nan or inf logit anywhere in a row makes its entropy nan, so this check covers the
    [R, C, V] logits without another pass over them. (Entropies are >= 0 and small: their row sum is finite
    exactly when all of them are.)"""
    finite = torch.isfinite(entropy.sum(-1))
    if not bool(finite.all()):
        raise NonFiniteRows((~finite).nonzero().flatten().tolist())


class GeneratorDraws:
    """Draws from a private torch.Generator: a row's output depends on its seed only, not on its neighbours."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.device = device

    def initial_canvas(self, length: int, vocab_size: int, canvas: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (length,), generator=self.generator, device=self.device)

    def proposals(self, probs: torch.Tensor, canvas: int, step: int) -> torch.Tensor:
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(-1)

    def proposals_into(self, probs: torch.Tensor, scratch: torch.Tensor, canvas: int, step: int) -> torch.Tensor:
        """`proposals`, bit for bit and with the same generator state after, but the [C, V] noise goes into
        `scratch` (float32 [C, V], overwritten) instead of a fresh buffer. torch.multinomial draws one
        sample as argmax(probs / q) with q ~ Exp(1) over the whole [C, V] (its one-sample path), which is
        what this does; tests/test_step_memory.py checks the equality."""
        noise = scratch.exponential_(1.0, generator=self.generator)
        return torch.div(probs, noise, out=noise).argmax(-1)

    def proposals_from_logits(self, logits: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
        """`proposals(softmax(logits))` for logits [C, V], bit for bit and with the same generator state
        after, holding one [C, V] float32 buffer (the noise) instead of two: the softmax is taken a chunk of
        positions at a time and divided straight into the noise (per position, so chunking changes no bit;
        see `proposals_into` for why this is torch.multinomial's draw)."""
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        noise.exponential_(1.0, generator=self.generator)
        for s in position_slices(logits.shape[0], logits.shape[-1], chunk_bytes):
            torch.div(torch.softmax(logits[s], dim=-1, dtype=torch.float32), noise[s], out=noise[s])
        return noise.argmax(-1)

    def noise(self, length: int, vocab_size: int, canvas: int, step: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (length,), generator=self.generator, device=self.device)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule over steps 0..N-1: t_max at the first step down to t_min + (t_max - t_min) / N at the
    last (the reference counts steps remaining, N..1). Computed in float32 as the reference does, so that
    the scaled logits agree to the bit."""
    remaining = torch.tensor(max_steps - step, dtype=torch.int32) / max_steps
    return float(t_min + (t_max - t_min) * remaining)


def row_proposals(draws: Draws, logits: torch.Tensor, canvas: int, step: int,
                  chunk_bytes: int | None = None) -> torch.Tensor:
    """One row's proposals from its processed logits [C, V]: `draws.proposals(softmax(logits))`, through
    `proposals_from_logits` (the same bits, one [C, V] buffer less) when the class that defines `proposals`
    also defines that. A subclass that overrides `proposals` alone (a test's replay, a fault injector) gets
    its own `proposals` called."""
    if _defined_by(draws, "proposals_from_logits") is _defined_by(draws, "proposals") is not None:
        return draws.proposals_from_logits(logits, chunk_bytes)
    return draws.proposals(torch.softmax(logits, dim=-1, dtype=torch.float32), canvas, step)


def _defined_by(obj: object, name: str) -> type | None:
    """The class of `obj` that defines method `name` (None: none does), to tell whether a subclass overrode it."""
    return next((c for c in type(obj).__mro__ if name in c.__dict__), None)


def token_entropy(logits: torch.Tensor, chunk_bytes: int | None = None, masked: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: [.., V] -> [..]. A chunk of positions at a time, so
    the temporaries (log-probabilities, p * log p) are [chunk, V], not [.., V]. `masked`: some logits are
    -inf on purpose (top_k), whose p * log p is 0 * -inf; log p is then clamped to the lowest finite float
    first, which changes no finite value (a nan from a bad logit stays nan, so check_finite still sees it)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    lowest = torch.finfo(torch.float32).min
    for s in position_slices(flat.shape[0], vocab, chunk_bytes):
        logp = torch.log_softmax(flat[s].float(), dim=-1)
        if masked:
            out[s] = -logp.exp().mul_(logp.clamp_(min=lowest)).sum(-1)
        else:
            out[s] = -logp.exp().mul_(logp).sum(-1)  # p * log p, in place: the same bits, one temporary less
        del logp  # before the next chunk's
    return out.reshape(logits.shape[:-1])


def apply_top_k_(logits: torch.Tensor, top_k: list[int] | None) -> bool:
    """In place on logits [R, C, V]: in each row r with top_k[r] > 0, every logit below its position's k-th
    largest becomes -inf (logits tied with the k-th stay, as in vLLM's threshold). As in vLLM's DiffusionGemma
    sampler, the proposals, the entropy (so which positions are accepted and when a canvas stops) and the
    self-conditioning input all see the filtered distribution; the argmax, the top-1 token, is unchanged.
    Returns whether any row was filtered (0, or k >= V, is no filter)."""
    vocab = logits.shape[-1]
    rows = [(r, k) for r, k in enumerate(top_k or ()) if 0 < k < vocab]
    for r, k in rows:
        row = logits[r]  # [C, V]
        kth = torch.topk(row, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [C, 1]
        row.masked_fill_(row < kth, float("-inf"))
    return bool(rows)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor | float,
                         clamp_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Accept the longest lowest-entropy prefix with sum(entropy) - max(entropy) <= bound (Ben-Hamu et al.,
    arXiv 2505.24857). The lowest-entropy position is always accepted. entropy: [R, C] -> accept_mask [R, C].
    With `clamp_mask` [R, C], only free positions are ranked (the lowest-entropy *free* one is always
    accepted) and clamped ones are never accepted; a row with no clamped position gives the same bits."""
    if clamp_mask is not None:
        # +inf sorts last and makes cumsum - current NaN (never <= bound) from the first clamped entry on
        entropy = entropy.masked_fill(clamp_mask, float("inf"))
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    bound = torch.as_tensor(bound, dtype=entropy.dtype, device=entropy.device).reshape(-1, 1)
    # In ascending order the running max is the current element, so cumsum - current is the LHS.
    accept_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    accept = torch.zeros_like(accept_sorted).scatter(-1, order, accept_sorted)
    return accept if clamp_mask is None else accept & ~clamp_mask


@dataclass
class Clamp:
    """Known tokens pinned in one canvas: `tokens[i]` is held wherever `mask[i]`; other positions are free.
    tokens: [C] long (its values at free positions are ignored), mask: [C] bool."""

    tokens: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, pinned: list[int | None]) -> Clamp:
        """From a list with a token id at each clamped position and None at each free one."""
        mask = torch.tensor([t is not None for t in pinned], dtype=torch.bool)
        return cls(torch.tensor([0 if t is None else t for t in pinned], dtype=torch.long), mask)

    @property
    def free(self) -> int:
        return int((~self.mask).sum())

    def to(self, device: torch.device | str) -> Clamp:
        return Clamp(self.tokens.to(device), self.mask.to(device))

    def apply(self, canvas: torch.Tensor) -> torch.Tensor:
        """canvas [C] with the clamped positions set to their tokens."""
        return torch.where(self.mask, self.tokens, canvas)


def stack_clamps(clamps: list[Clamp | None], length: int,
                 device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row clamps -> (tokens [R, C], mask [R, C]) for the step functions; (None, None) when no row has
    one, so that unclamped batches take exactly the old path. A row without a clamp gets an all-False mask."""
    if all(c is None for c in clamps):
        return None, None
    tokens = torch.zeros(len(clamps), length, dtype=torch.long, device=device)
    mask = torch.zeros(len(clamps), length, dtype=torch.bool, device=device)
    for r, c in enumerate(clamps):
        if c is not None:
            tokens[r], mask[r] = c.tokens, c.mask
    return tokens, mask


def free_mean_entropy(entropy: torch.Tensor, clamp_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean entropy per row over its free positions: [R, C] -> [R]. Rows without clamps use `mean` itself
    (not sum / count), so their bits do not change; a row with no free position counts as certain (0)."""
    plain = entropy.mean(-1)
    if clamp_mask is None:
        return plain
    free = (~clamp_mask).sum(-1)
    masked = entropy.masked_fill(clamp_mask, 0.0).sum(-1) / free.clamp(min=1)
    return torch.where(clamp_mask.any(-1), masked, plain)


def pin(canvas: torch.Tensor, clamp_tokens: torch.Tensor | None, clamp_mask: torch.Tensor | None) -> torch.Tensor:
    """[R, C] canvas with clamped positions replaced by their tokens (the identity without clamps)."""
    return canvas if clamp_mask is None else torch.where(clamp_mask, clamp_tokens.to(canvas.device), canvas)


@dataclass
class StepOutcome:
    """One denoising step for R rows."""

    next_canvas: torch.Tensor  # [R, C] accepted proposals, fresh noise elsewhere
    argmax: torch.Tensor  # [R, C] the canvas a row ends with if it stops now
    accept_mask: torch.Tensor  # [R, C]
    mean_entropy: torch.Tensor  # [R]
    processed_logits: torch.Tensor | None  # [R, C, V] temperature-scaled, for self-conditioning


def denoise_step(logits: torch.Tensor, temperatures: torch.Tensor, entropy_bounds: torch.Tensor,
                 draws: list[Draws], canvas_index: list[int], step_index: list[int],
                 greedy: list[bool] | None = None, clamp_tokens: torch.Tensor | None = None,
                 clamp_mask: torch.Tensor | None = None, top_k: list[int] | None = None, in_place: bool = False,
                 chunk_bytes: int | None = None) -> StepOutcome:
    """logits: [R, C, V] float32; temperatures, entropy_bounds: [R]; one `Draws` per row. A `greedy` row
    proposes the argmax instead of sampling (and draws no proposals); its schedule, acceptance and
    re-noising are unchanged. `clamp_tokens` / `clamp_mask` [R, C] (from `stack_clamps`): see the module
    docstring; every row still draws proposals and noise for all C positions, so a row's random stream
    does not depend on its clamp. `top_k` [R] (0: off) filters each row's distribution (`apply_top_k_`).
    `in_place`: the caller hands `logits` over; they are divided by the temperatures (and filtered) in
    place and returned as the processed logits (the same bits, no second [R, C, V] copy).

    Memory beyond `logits`: the processed logits (returned; none with `in_place`) and, while a row draws,
    one [C, V] float32 noise buffer (`GeneratorDraws.proposals_from_logits`); the entropy and the
    sampling softmax run a chunk of positions at a time (benchmarks/memory.py)."""
    scale = temperatures.to(logits.device, logits.dtype)[:, None, None]
    processed = logits.div_(scale) if in_place else logits / scale
    entropy = token_entropy(processed, chunk_bytes, masked=apply_top_k_(processed, top_k))
    check_finite(entropy)  # before any row draws, so a retry without the bad rows draws the same numbers
    accept = entropy_bound_accept(entropy, entropy_bounds.to(entropy.device), clamp_mask)
    rows, length, vocab = processed.shape
    argmax = processed.argmax(-1)
    # the softmax is taken a row at a time (the same bits as all rows at once: each position on its own)
    proposals = torch.stack([argmax[r] if greedy and greedy[r] else
                             row_proposals(d, processed[r], canvas_index[r], step_index[r],
                                           chunk_bytes).to(logits.device)
                             for r, d in enumerate(draws)])
    noise = torch.stack([d.noise(length, vocab, canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    next_canvas = torch.where(accept, proposals.to(logits.device), noise.to(logits.device))
    return StepOutcome(pin(next_canvas, clamp_tokens, clamp_mask), pin(argmax, clamp_tokens, clamp_mask), accept,
                       free_mean_entropy(entropy, clamp_mask), processed)
