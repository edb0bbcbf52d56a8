"""The fused sampler pass: `sampling.denoise_step` with fewer passes over the [R, C, V] logits.

Same results as the plain step, bit for bit on float32 logits (tests/test_fast_path.py): the same ops run
on the same values, only reorganised:

- the temperature divides the logits in place (the caller hands them over), so there is no second
  [R, C, V] float32 copy;
- the entropy runs a chunk of positions at a time (`sampling.token_entropy`), and each row's softmax is
  written a chunk at a time straight into `sc_probs`: the softmax the proposals are drawn from is also the
  self-conditioning input of the next step (in the model's dtype), so the model does not compute that
  softmax again (`DiffusionGemma.denoise(..., self_conditioning_probs=...)`);
- with `keep_processed=False` (the runner) a row's processed logits, once its entropy, argmax and softmax
  are taken, hold torch.multinomial's [C, V] noise (`GeneratorDraws.proposals_into`), so drawing needs no
  new [C, V] buffer; `processed_logits` is then None.

Memory beyond the logits at the released vocabulary: `sc_probs` (one [C, V] per row in the model's dtype,
the next step's state), a float32 [C, V] for the row being drawn when that dtype is not float32, and
[chunk, V] temporaries: at most about two [C, V] float32 tensors per row with the logits
(benchmarks/memory.py, tests/test_step_memory.py).

Randomness still comes only from each row's own `Draws`, in the plain step's order (proposals, then
noise, row by row), so a seeded row gives the same tokens on either path.

On a GPU, vLLM's answer is one Triton kernel that reads the logits once (argmax, Gumbel-max sample,
entropy, bf16 softmax); we have not written one: nothing here could run or test it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunks import position_slices
from .sampling import (Draws, StepOutcome, _defined_by, apply_top_k_, check_finite, entropy_bound_accept,
                       free_mean_entropy, pin, token_entropy)


@dataclass
class FusedStepOutcome(StepOutcome):
    # [R, C, V] softmax of processed_logits in the model's dtype: next step's self-conditioning input
    sc_probs: torch.Tensor | None = None


def _softmax_into(out: torch.Tensor, logits: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """out [C, V] <- softmax(logits [C, V]), a chunk of positions at a time. A 16-bit `out` gets the softmax of
    the logits rounded to its dtype: what the plain runner's stored state (processed logits in the model's
    dtype) gives when the model takes its softmax."""
    for s in slices:
        chunk = logits[s] if out.dtype == torch.float32 else logits[s].to(out.dtype)
        out[s] = torch.softmax(chunk, dim=-1, dtype=torch.float32)
    return out


def _draw(draws: Draws, probs: torch.Tensor, scratch: torch.Tensor | None, canvas: int, step: int) -> torch.Tensor:
    """One row's proposals; into `scratch` where the draws can (same bits either way). `proposals_into` is
    used only when the class that defines `proposals` also defines it: a subclass that overrides
    `proposals` alone (a test's replay, a fault injector) gets its own `proposals` called."""
    if scratch is not None and _defined_by(draws, "proposals_into") is _defined_by(draws, "proposals") is not None:
        return draws.proposals_into(probs, scratch, canvas, step)
    return draws.proposals(probs, canvas, step)


def fused_denoise_step(logits: torch.Tensor, temperatures: torch.Tensor, entropy_bounds: torch.Tensor,
                       draws: list[Draws], canvas_index: list[int], step_index: list[int],
                       greedy: list[bool] | None = None, clamp_tokens: torch.Tensor | None = None,
                       clamp_mask: torch.Tensor | None = None, sc_dtype: torch.dtype | None = None,
                       keep_processed: bool = True, chunk_bytes: int | None = None,
                       top_k: list[int] | None = None) -> FusedStepOutcome:
    """`sampling.denoise_step` (same arguments, same results) plus `sc_probs`. logits: [R, C, V] float32,
    *consumed* (divided in place by the temperatures; with `keep_processed=False` also reused as scratch,
    and `processed_logits` is None); `sc_dtype`: the model's dtype, for `sc_probs`."""
    processed = logits.div_(temperatures.to(logits.device, logits.dtype)[:, None, None])
    entropy = token_entropy(processed, chunk_bytes, masked=apply_top_k_(processed, top_k))
    check_finite(entropy)  # before any row draws (sampling.denoise_step)
    accept = entropy_bound_accept(entropy, entropy_bounds.to(entropy.device), clamp_mask)
    argmax = processed.argmax(-1)
    rows, length, vocab = processed.shape
    sc_dtype = sc_dtype or torch.float32
    sc_probs = torch.empty(processed.shape, dtype=sc_dtype, device=processed.device)
    slices = position_slices(length, vocab, chunk_bytes)
    proposals = []
    for r, d in enumerate(draws):
        row = processed[r]
        _softmax_into(sc_probs[r], row, slices)
        if greedy and greedy[r]:
            proposals.append(argmax[r])
            continue
        # drawn from the float32 softmax: for a float32 model the state itself
        probs = sc_probs[r] if sc_dtype == torch.float32 else _softmax_into(torch.empty_like(row), row, slices)
        scratch = None if keep_processed else row  # this row's logits are spent: entropy, argmax, softmax taken
        proposals.append(_draw(d, probs, scratch, canvas_index[r], step_index[r]).to(logits.device))
        del probs
    proposals = torch.stack(proposals)
    noise = torch.stack([d.noise(length, vocab, canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    next_canvas = torch.where(accept, proposals, noise.to(logits.device))
    return FusedStepOutcome(pin(next_canvas, clamp_tokens, clamp_mask), pin(argmax, clamp_tokens, clamp_mask), accept,
                            free_mean_entropy(entropy, clamp_mask), processed if keep_processed else None, sc_probs)
