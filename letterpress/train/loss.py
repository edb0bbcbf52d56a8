"""Uniform-state diffusion SFT for DiffusionGemma: how a batch is drawn, and the loss on it.

Per example (see /shared/reference/diffusiongemma.md, "Training"):
- The target (answer tokens + one terminating EOS) is split into canvases of C tokens; one canvas, drawn
  uniformly, is scored. The rest of the last canvas is filled with EOS (scored by default, as Google's JAX
  recipe does, so the model learns to write EOS after an answer).
- The clean prompt plus the clean canvases before the scored one go through the causal encoder; its KV cache
  is the decoder's context.
- One t ~ U(eps, 1 - eps); each canvas position is kept with probability alpha = 1 - t, else replaced by a token
  drawn uniformly from all V ids (which may be the original token).
- The decoder sees the corrupted canvas. Self-conditioning, per example with probability p: a first decoder
  pass without signal and without gradient; the second pass gets its detached logits (softmax at temperature 1
  inside `denoise`). Examples that do not use it get an exactly zero signal (`self_conditioning_mask`).
- Diffusion loss: cross-entropy of the clean token at every scored position, corrupted or not, times w(t):
  "base-sft" w = 1; "reweighted-ce" w = -alpha'(t)/alpha(t) = 1/(1-t), clipped at `reweight_max` (the weight
  grows without bound as t -> 1, where the canvas is almost pure noise; no 1/V factor).
- Encoder loss: next-token cross-entropy of the target tokens on the clean prompt + target, from a separate
  encoder pass (the decoder's context never contains the scored canvas).

Randomness: every draw comes from a per-example `torch.Generator`, so an example's noise does not depend on its
batch neighbours, on gradient accumulation or on how a global batch is split across processes. Losses come
back as sums with counts; the caller divides by counts summed over the whole (global) batch, so that a batch
split into micro-batches or across ranks gives the same loss as one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, TrainError

OBJECTIVES = ("base-sft", "reweighted-ce")


@dataclass
class LossConfig:
    canvas_length: int = 256
    eos_id: int = 1  # the terminating token appended to every target and used to fill the last canvas
    objective: str = "base-sft"  # or "reweighted-ce"
    t_eps: float = 1e-3  # t ~ U(t_eps, 1 - t_eps), as Megatron
    reweight_max: float = 10.0  # "reweighted-ce" clips w(t) = 1/(1-t) here
    score_eos_fill: bool = True  # score the EOS that fill the last canvas after the terminating one
    self_conditioning_prob: float = 0.5
    encoder_loss_weight: float = 1.0  # 0 skips the encoder next-token pass
    diffusion_loss_weight: float = 1.0  # 0 skips the decoder passes: an autoregressive-only objective (baselines)
    # Share of examples whose canvas is noised as a suffix instead of position by position: the first (1 - t) of
    # the answer's tokens kept, the rest (and the EOS fill) noise. Uniform noise rarely shows a worked step (a
    # thought) whole while the token that depends on it is hidden; a suffix always does, as an autoregressive
    # scratchpad does. 0 (the released recipe) draws nothing extra, so existing runs are unchanged.
    suffix_noise_share: float = 0.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise TrainError(f"unknown loss objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not 0 < self.t_eps < 0.5:
            raise TrainError("t_eps must be in (0, 0.5)")
        if not 0 <= self.self_conditioning_prob <= 1:
            raise TrainError("self_conditioning_prob must be in [0, 1]")
        if not 0 <= self.suffix_noise_share <= 1:
            raise TrainError("suffix_noise_share must be in [0, 1]")
        if self.diffusion_loss_weight < 0 or self.encoder_loss_weight < 0:
            raise TrainError("loss weights must be >= 0")
        if not (self.diffusion_loss_weight or self.encoder_loss_weight):
            raise TrainError("both loss weights are 0: nothing to train")
        if self.canvas_length < 1:
            raise TrainError("canvas_length must be positive")


@dataclass(frozen=True)
class Example:
    """One training example as token ids. `target` excludes the terminating EOS: the loss appends it."""

    prompt: Sequence[int]
    target: Sequence[int]


@dataclass
class DiffusionBatch:
    """Everything the loss needs, drawn up front (token manipulation only, no model)."""

    context_ids: torch.Tensor  # [B, Tc] clean prompt + earlier canvases, right-padded with 0
    context_lengths: torch.Tensor  # [B]
    clean: torch.Tensor  # [B, C] the scored canvas, EOS-filled
    noisy: torch.Tensor  # [B, C] the decoder's input after corruption
    scored: torch.Tensor  # [B, C] bool
    t: torch.Tensor  # [B] float32
    self_conditioning: torch.Tensor  # [B] bool
    sequence_ids: torch.Tensor  # [B, Ts] prompt + target + EOS, right-padded: the encoder loss's input
    sequence_lengths: torch.Tensor  # [B]
    next_token_scored: torch.Tensor  # [B, Ts] bool: position i predicts token i + 1, a target token

    def to(self, device: torch.device | str) -> "DiffusionBatch":
        return DiffusionBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def size(self) -> int:
        return self.clean.shape[0]

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def num_next_token_scored(self) -> int:
        return int(self.next_token_scored.sum())


@dataclass
class _Row:
    context: list[int]
    clean: list[int]
    scored: list[bool]
    noisy: torch.Tensor
    t: float
    self_conditioning: bool
    sequence: list[int]
    target_start: int  # index in `sequence` of the first target token


def draw_row(example: Example, cfg: LossConfig, vocab_size: int, generator: torch.Generator) -> _Row:
    """One example's draws, always in the same order: canvas index, t, keep mask, noise, self-conditioning, and,
    only when `suffix_noise_share` > 0, whether the canvas is noised as a suffix."""
    prompt, c = list(example.prompt), cfg.canvas_length
    if not prompt:
        raise DataError("an example needs a non-empty prompt (at least BOS): the decoder reads its context")
    target = list(example.target) + [cfg.eos_id]
    num_canvases = math.ceil(len(target) / c)
    k = int(torch.randint(num_canvases, (), generator=generator))
    real = target[k * c:(k + 1) * c]
    fill = c - len(real)
    clean = real + [cfg.eos_id] * fill
    t = cfg.t_eps + (1 - 2 * cfg.t_eps) * float(torch.rand((), generator=generator))
    keep = torch.rand(c, generator=generator) < 1 - t
    noise = torch.randint(vocab_size, (c,), generator=generator)
    self_conditioning = bool(torch.rand((), generator=generator) < cfg.self_conditioning_prob)
    if cfg.suffix_noise_share and float(torch.rand((), generator=generator)) < cfg.suffix_noise_share:
        keep = torch.arange(c) < math.floor((1 - t) * len(real))
    noisy = torch.where(keep, torch.tensor(clean), noise)
    return _Row(context=prompt + target[:k * c], clean=clean, scored=[True] * len(real) + [cfg.score_eos_fill] * fill,
                noisy=noisy, t=t, self_conditioning=self_conditioning, sequence=prompt + target,
                target_start=len(prompt))


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), max(1, int(lengths.max())), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def make_batch(examples: Sequence[Example], cfg: LossConfig, vocab_size: int,
               generators: torch.Generator | Sequence[torch.Generator]) -> DiffusionBatch:
    """Draw canvases, times, noise and self-conditioning flags for `examples`. `generators`: one per example
    (batch-invariant draws), or a single generator that the rows draw from in turn."""
    if isinstance(generators, torch.Generator):
        generators = [generators] * len(examples)
    if len(generators) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(generators)} generators")
    rows = [draw_row(ex, cfg, vocab_size, g) for ex, g in zip(examples, generators)]
    context_ids, context_lengths = _pad([r.context for r in rows])
    sequence_ids, sequence_lengths = _pad([r.sequence for r in rows])
    positions = torch.arange(sequence_ids.shape[1])[None, :]
    starts = torch.tensor([r.target_start for r in rows])[:, None]
    # Position i is scored when token i + 1 is a target token (the prompt is context, not a label).
    next_token_scored = (positions + 1 >= starts) & (positions + 1 < sequence_lengths[:, None])
    return DiffusionBatch(
        context_ids=context_ids, context_lengths=context_lengths,
        clean=torch.tensor([r.clean for r in rows], dtype=torch.long),
        noisy=torch.stack([r.noisy for r in rows]),
        scored=torch.tensor([r.scored for r in rows], dtype=torch.bool),
        t=torch.tensor([r.t for r in rows], dtype=torch.float32),
        self_conditioning=torch.tensor([r.self_conditioning for r in rows], dtype=torch.bool),
        sequence_ids=sequence_ids, sequence_lengths=sequence_lengths, next_token_scored=next_token_scored,
    )


def time_weight(t: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """w(t) per example [B]. reweighted-ce: -alpha'(t)/alpha(t) with alpha = 1 - t, i.e. 1/(1-t), clipped."""
    if cfg.objective == "base-sft":
        return torch.ones_like(t)
    return (1.0 / (1.0 - t)).clamp(max=cfg.reweight_max)


@dataclass
class LossSums:
    """Summed losses and how many positions they cover; divide by counts summed over the global batch."""

    diffusion: torch.Tensor  # sum over scored canvas positions of w(t) * CE
    encoder: torch.Tensor  # sum over target tokens of the encoder's next-token CE (0 when disabled)
    diffusion_count: int
    encoder_count: int


def loss_sums(model: nn.Module, batch: DiffusionBatch, cfg: LossConfig) -> LossSums:
    """Forward passes and summed losses for one (micro-)batch already on the model's device."""
    diffusion = (diffusion_sum(model, batch, cfg) if cfg.diffusion_loss_weight
                 else torch.zeros((), device=batch.clean.device))
    return LossSums(diffusion=diffusion, encoder=encoder_sum(model, batch, cfg),
                    diffusion_count=batch.num_scored,
                    encoder_count=batch.num_next_token_scored if cfg.encoder_loss_weight else 0)


def diffusion_sum(model: nn.Module, batch: DiffusionBatch, cfg: LossConfig, soft_tokens: torch.Tensor | None = None,
                  soft_token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`soft_tokens` / `soft_token_mask`: image embeddings for the context's placeholder positions, as
    `DiffusionGemma.encode` takes them (the tiny-vlm recipe, letterpress.train.vlm)."""
    b = batch.size
    # A fresh cache per batch: encode writes into it in place and autograd follows those writes.
    cache = model.new_cache(b, int(batch.context_lengths.max()))
    context_hidden = model.encode(batch.context_ids, cache, input_lengths=batch.context_lengths,
                                  soft_tokens=soft_tokens, soft_token_mask=soft_token_mask)
    sc_logits = sc_mask = None
    # Pass 1 runs whenever self-conditioning is on, even if no row of this batch drew it: every rank then
    # runs the same passes, which sharded (FSDP) training needs for its collectives to line up.
    if cfg.self_conditioning_prob > 0:
        with torch.no_grad():
            sc_logits = model.denoise(batch.noisy, cache).detach()
        sc_mask = batch.self_conditioning
    logits = model.denoise(batch.noisy, cache, self_conditioning_logits=sc_logits,
                           self_conditioning_mask=sc_mask)  # [B, C, V] float32
    ce = F.cross_entropy(logits.flatten(0, 1), batch.clean.flatten(), reduction="none").view(b, -1)
    loss = (ce * time_weight(batch.t, cfg)[:, None] * batch.scored).sum()
    # The encoder's hidden states reach the loss only through the KV cache, a side channel that FSDP2 cannot
    # see: it unshards a layer for backward when gradient reaches the layer's *output*. Adding exactly zero
    # times the encoder output routes a (zero) gradient through those outputs, so every layer is unsharded
    # before autograd needs its weights. The value and the gradients are unchanged.
    return loss + 0.0 * context_hidden.sum()


def encoder_sum(model: nn.Module, batch: DiffusionBatch, cfg: LossConfig, soft_tokens: torch.Tensor | None = None,
                soft_token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`soft_tokens` / `soft_token_mask` [B, Ts]: image embeddings for the sequence's placeholder positions."""
    if not cfg.encoder_loss_weight:
        return torch.zeros((), device=batch.clean.device)
    cache = model.new_cache(batch.size, batch.sequence_ids.shape[1])
    hidden = model.encode(batch.sequence_ids, cache, input_lengths=batch.sequence_lengths,
                          soft_tokens=soft_tokens, soft_token_mask=soft_token_mask)  # [B, Ts, H]
    rows, pos = batch.next_token_scored.nonzero(as_tuple=True)
    # Only the scored positions go through the LM head: [N, V] instead of [B, Ts, V].
    logits = model.lm_logits(hidden[rows, pos])
    return F.cross_entropy(logits, batch.sequence_ids[rows, pos + 1], reduction="sum")


def total_loss(sums: LossSums, cfg: LossConfig, diffusion_count: int | None = None,
               encoder_count: int | None = None) -> torch.Tensor:
    """diffusion mean + weight * encoder mean; counts default to this batch's own (pass global ones when the
    batch is a slice of a bigger one)."""
    d = diffusion_count if diffusion_count is not None else sums.diffusion_count
    e = encoder_count if encoder_count is not None else sums.encoder_count
    loss = cfg.diffusion_loss_weight * sums.diffusion / max(d, 1)
    if cfg.encoder_loss_weight and e:
        loss = loss + cfg.encoder_loss_weight * sums.encoder / e
    return loss


class LossModule(nn.Module):
    """The model and its loss behind one `forward`, so that FSDP / DDP hooks see every pass of a step."""

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: DiffusionBatch) -> LossSums:
        return loss_sums(self.model, batch, self.cfg)
