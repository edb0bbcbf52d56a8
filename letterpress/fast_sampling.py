"""The fused sampler pass: `sampling.denoise_step` with fewer passes over the [R, C, V] logits.

Same results as the plain step, bit for bit on float32 logits (tests/test_fast_path.py): the same ops run
on the same values, only reorganised:

- the temperature divides the logits in place (the caller hands them over), so there is no second
  [R, C, V] float32 copy;
- the entropy is computed a row at a time, so its temporaries (log-probabilities, p * log p) are [C, V]
  instead of [R, C, V];
- the softmax the proposals are drawn from is also the self-conditioning input of the next step
  (`sc_probs`, in the model's dtype), so the model does not compute that softmax again
  (`DiffusionGemma.denoise(..., self_conditioning_probs=...)`).

Randomness still comes only from each row's own `Draws`, in the plain step's order (proposals, then
noise, row by row), so a seeded row gives the same tokens on either path.

On a GPU, vLLM's answer is one Triton kernel that reads the logits once (argmax, Gumbel-max sample,
entropy, bf16 softmax); we have not written one: nothing here could run or test it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import Draws, StepOutcome, check_finite, entropy_bound_accept, free_mean_entropy, pin


@dataclass
class FusedStepOutcome(StepOutcome):
    # [R, C, V] softmax of processed_logits in the model's dtype: next step's self-conditioning input
    sc_probs: torch.Tensor | None = None


def row_entropy(processed: torch.Tensor) -> torch.Tensor:
    """`sampling.token_entropy` (same ops, same bits) one row at a time: [R, C, V] -> [R, C]."""
    out = torch.empty(processed.shape[:-1], dtype=torch.float32, device=processed.device)
    for r in range(processed.shape[0]):
        logp = torch.log_softmax(processed[r].float(), dim=-1)
        out[r] = -(logp.exp() * logp).sum(-1)
    return out


def fused_denoise_step(logits: torch.Tensor, temperatures: torch.Tensor, entropy_bounds: torch.Tensor,
                       draws: list[Draws], canvas_index: list[int], step_index: list[int],
                       greedy: list[bool] | None = None, clamp_tokens: torch.Tensor | None = None,
                       clamp_mask: torch.Tensor | None = None, sc_dtype: torch.dtype | None = None) -> FusedStepOutcome:
    """`sampling.denoise_step` (same arguments, same results) plus `sc_probs`. logits: [R, C, V] float32,
    *consumed* (divided in place by the temperatures); `sc_dtype`: the model's dtype, for `sc_probs`."""
    processed = logits.div_(temperatures.to(logits.device, logits.dtype)[:, None, None])
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    entropy = row_entropy(processed)
    check_finite(entropy)  # before any row draws (sampling.denoise_step)
    accept = entropy_bound_accept(entropy, entropy_bounds.to(entropy.device), clamp_mask)
    argmax = processed.argmax(-1)
    rows, length, vocab = processed.shape
    proposals = torch.stack([argmax[r] if greedy and greedy[r] else
                             d.proposals(probs[r], canvas_index[r], step_index[r]).to(logits.device)
                             for r, d in enumerate(draws)])
    noise = torch.stack([d.noise(length, vocab, canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    next_canvas = torch.where(accept, proposals, noise.to(logits.device))
    sc_dtype = sc_dtype or torch.float32
    if sc_dtype == torch.float32:
        sc_probs = probs  # exactly what the model's softmax of the float32 processed logits gives
    else:
        # the plain runner stores processed.to(dtype) and the model softmaxes that: same values here
        sc_probs = torch.softmax(processed.to(sc_dtype), dim=-1, dtype=torch.float32).to(sc_dtype)
    return FusedStepOutcome(pin(next_canvas, clamp_tokens, clamp_mask), pin(argmax, clamp_tokens, clamp_mask), accept,
                            free_mean_entropy(entropy, clamp_mask), processed, sc_probs)
