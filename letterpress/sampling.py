"""The denoising sampler: temperature schedule, proposals, entropy-bound acceptance, re-noising, stopping.

Pure functions over tensors plus the `Draws` interface that supplies every random number. Nothing here
knows about the model. Shapes: R rows, C canvas positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Draws(Protocol):
    """Where a row's randomness comes from. The engine asks in a fixed order per row; tests replay the
    reference's draws by (canvas, step) instead of by order, since the reference also draws for rows that
    already stopped."""

    def initial_canvas(self, length: int, vocab_size: int, canvas: int) -> torch.Tensor: ...

    def proposals(self, probs: torch.Tensor, canvas: int, step: int) -> torch.Tensor: ...

    def noise(self, length: int, vocab_size: int, canvas: int, step: int) -> torch.Tensor: ...


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

    def noise(self, length: int, vocab_size: int, canvas: int, step: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (length,), generator=self.generator, device=self.device)


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule over steps 0..N-1: t_max at the first step down to t_min + (t_max - t_min) / N at the
    last (the reference counts steps remaining, N..1). Computed in float32 as the reference does, so that
    the scaled logits agree to the bit."""
    remaining = torch.tensor(max_steps - step, dtype=torch.int32) / max_steps
    return float(t_min + (t_max - t_min) * remaining)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: [.., V] -> [..]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """Accept the longest lowest-entropy prefix with sum(entropy) - max(entropy) <= bound (Ben-Hamu et al.,
    arXiv 2505.24857). The lowest-entropy position is always accepted. entropy: [R, C] -> accept_mask [R, C]."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    bound = torch.as_tensor(bound, dtype=entropy.dtype, device=entropy.device).reshape(-1, 1)
    # In ascending order the running max is the current element, so cumsum - current is the LHS.
    accept_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(accept_sorted).scatter(-1, order, accept_sorted)


@dataclass
class StepOutcome:
    """One denoising step for R rows."""

    next_canvas: torch.Tensor  # [R, C] accepted proposals, fresh noise elsewhere
    argmax: torch.Tensor  # [R, C] the canvas a row ends with if it stops now
    accept_mask: torch.Tensor  # [R, C]
    mean_entropy: torch.Tensor  # [R]
    processed_logits: torch.Tensor  # [R, C, V] temperature-scaled, for self-conditioning


def denoise_step(logits: torch.Tensor, temperatures: torch.Tensor, entropy_bounds: torch.Tensor,
                 draws: list[Draws], canvas_index: list[int], step_index: list[int]) -> StepOutcome:
    """logits: [R, C, V] float32; temperatures, entropy_bounds: [R]; one `Draws` per row."""
    processed = logits / temperatures.to(logits.device, logits.dtype)[:, None, None]
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    entropy = token_entropy(processed)
    accept = entropy_bound_accept(entropy, entropy_bounds.to(entropy.device))
    rows, length, vocab = processed.shape
    proposals = torch.stack([d.proposals(probs[r], canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    noise = torch.stack([d.noise(length, vocab, canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    next_canvas = torch.where(accept, proposals.to(logits.device), noise.to(logits.device))
    return StepOutcome(next_canvas, processed.argmax(-1), accept, entropy.mean(-1), processed)
