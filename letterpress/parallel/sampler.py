"""The sampler's vocabulary passes over the ranks' slices of the logits (`sampling.denoise_step` and
`fast_sampling.fused_denoise_step` under tensor parallelism).

Every rank holds the float32 logits of its vocabulary slice [R, C, V / N] (vocab.py) and runs
`sample_slice` on them with the same per-row settings (`SamplePlan`, sent by rank 0). What crosses ranks
is per position, never per token:

    top_k          the k largest of each rank's slice, all-gathered: [R_k, C, min(k, V / N)] per rank,
                   whose k-th largest is the whole vocabulary's (the same threshold, bit for bit)
    argmax, max    one all-reduce MAX of int64 order keys [R, C] (vocab.order_key): exactly torch.argmax
    entropy        one all-reduce SUM of [3, R, C] float32: sum of exp(x - max), sum of exp(x - max)(x - max),
                   and a count of non-finite logits (so a nan anywhere still fails its row, NonFiniteRows)
    proposals      one all-reduce MAX of int64 keys of max(p / q) over the rank's slice, q the row's
                   exponential noise: torch.multinomial's one-sample draw, argmax(p / q) over the whole [C, V]

The noise is the single process's, bit for bit, whatever N is: a row's generator fills [C, V] with Exp(1)
in row-major order (`GeneratorDraws.proposals_from_logits`), and rank r needs columns [v0, v1) of it. Rank
0 sends the generator's state; each rank draws the row's noise a chunk of positions at a time and keeps its
columns. On the CPU (mt19937, one number per element in order) drawing [C, V] in chunks gives the same
numbers as one call and leaves the same state (tests/test_parallel.py checks it), so a rank holds a [chunk,
V] buffer, not [C, V]; on other devices the chunking of a call changes its numbers (CUDA's Philox assigns
them by thread), so there each rank draws the row's whole [C, V] at once, as the single process does, and
keeps its columns. Rank 0 draws with the row's own generator, so its state afterwards is what it would be
in one process, and the re-noising draw that follows (`Draws.noise`) is the same.

What is not the same bits as one process: the softmax and the entropy are sums over the whole vocabulary,
here taken as per-rank partial sums added by the all-reduce, so they differ in float32 rounding (~1e-7
relative), as the logits themselves do after the layers' all-reduces. A proposal or an acceptance can only
change where two candidates tie within that rounding.

Rows whose `Draws` override `proposals` (a test's replay) and structured-output rows (the automaton's DP
reads every token's log-probability) get their row's whole [C, V] gathered to rank 0, as before.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import chunks
from ..chunks import position_slices
from ..sampling import check_finite
from .vocab import all_reduce, key_index, key_value, max_key

FLOAT32_LOWEST = torch.finfo(torch.float32).min


@dataclasses.dataclass
class SamplePlan:
    """What every rank needs for one sampler step of R rows (rank 0 sends it; a few KB)."""

    temperatures: torch.Tensor  # [R] float32
    top_k: list[int] | None  # [R], 0: off
    draw_states: list[torch.Tensor | None]  # [R] the row generator's state before the draw; None: no draw here
    gather_probs: list[int]  # rows whose Draws need the whole probabilities on rank 0
    gather_log_probs: list[int]  # rows whose whole log-probabilities rank 0 needs (structured output)
    keep_probs: bool = False  # the fused path: keep each row's softmax (model dtype) as its state
    state_dtype: torch.dtype = torch.float32


@dataclasses.dataclass
class SliceOutcome:
    """What `sample_slice` gives every rank; the gathered tensors only on rank 0."""

    argmax: torch.Tensor  # [R, C] over the whole vocabulary
    entropy: torch.Tensor  # [R, C] float32
    drawn: torch.Tensor  # [R, C] the proposals of rows with a draw state (others: garbage)
    state: torch.Tensor  # [R, C, V / N] this rank's slice of each row's self-conditioning state
    probs: dict[int, torch.Tensor]  # row -> [C, V] float32 (rank 0)
    log_probs: dict[int, torch.Tensor]  # row -> [C, V] float32 (rank 0)
    vocab: int


def apply_top_k_slices_(x: torch.Tensor, top_k: list[int] | None, vocab: int, group) -> bool:
    """`sampling.apply_top_k_` on slices x [R, C, n]: the k-th largest over the whole vocabulary from each
    rank's k largest, all-gathered (padded with -inf to min(k, ceil(V / N)))."""
    rows = [(r, k) for r, k in enumerate(top_k or ()) if 0 < k < vocab]
    if not rows:
        return False
    world = dist.get_world_size(group)
    width = min(max(k for _, k in rows), -(-vocab // world))
    local = torch.full((len(rows), x.shape[1], width), float("-inf"), dtype=x.dtype, device=x.device)
    for j, (r, k) in enumerate(rows):
        take = min(k, width, x.shape[-1])
        local[j, :, :take] = torch.topk(x[r], take, dim=-1, sorted=False).values
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    every = torch.cat(parts, dim=-1)  # [R_k, C, N * width]
    for j, (r, k) in enumerate(rows):
        kth = torch.topk(every[j], k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        x[r].masked_fill_(x[r] < kth, float("-inf"))
    return True


def noise_columns(generator: torch.Generator, length: int, vocab: int, v0: int, v1: int, device,
                  chunk_bytes: int | None = None):
    """Yield (positions slice, Exp(1) noise [positions, v1 - v0]): columns [v0, v1) of the [length, vocab]
    noise one `exponential_` call on `generator` draws, a chunk of positions at a time on the CPU (the
    module docstring says why only there)."""
    if torch.device(device).type != "cpu":
        whole = torch.empty(length, vocab, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)
        yield slice(0, length), whole[:, v0:v1]
        return
    for s in position_slices(length, vocab, chunk_bytes):
        chunk = torch.empty(s.stop - s.start, vocab, dtype=torch.float32, device=device)
        yield s, chunk.exponential_(1.0, generator=generator)[:, v0:v1]
        del chunk


def _gather_rows(rows: list[int], slices: dict[int, torch.Tensor], vocab_slice: tuple[int, int, int],
                 group) -> dict[int, torch.Tensor]:
    """Rank 0 <- each rank's [C, n] slice of `rows`: the whole [C, V] per row (padded gathers)."""
    if not rows:
        return {}
    v0, v1, vocab = vocab_slice
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = -(-vocab // world)
    out = {}
    for r in rows:
        local = slices[r]
        padded = torch.zeros(local.shape[0], size, dtype=torch.float32, device=local.device)
        padded[:, : v1 - v0] = local
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, parts, dst=0, group=group)
        if rank == 0:
            out[r] = torch.cat(parts, dim=-1)[:, :vocab]
        del padded, parts
    return out


def sample_slice(x: torch.Tensor, plan: SamplePlan, vocab_slice: tuple[int, int, int], group,
                 generators: list[torch.Generator | None], chunk_bytes: int | None = None) -> SliceOutcome:
    """One sampler step on this rank's logits x [R, C, v1 - v0] float32 (consumed: divided in place by the
    temperatures, filtered by top_k). Every rank calls it with the same plan; `generators[r]` draws row r's
    noise (rank 0: the row's own generator; the others: a copy at `plan.draw_states[r]`). Raises
    NonFiniteRows on every rank alike, before any draw."""
    v0, v1, vocab = vocab_slice
    rows, length, n = x.shape
    x.div_(plan.temperatures.to(x.device, x.dtype)[:, None, None])
    masked = apply_top_k_slices_(x, plan.top_k, vocab, group)

    keys = all_reduce(max_key_rows(x, v0), group, dist.ReduceOp.MAX)  # [R, C]
    argmax, m = key_index(keys), key_value(keys)  # the whole vocabulary's argmax and max
    stats = torch.zeros(3, rows, length, dtype=torch.float32, device=x.device)
    for r in range(rows):
        for s in position_slices(length, vocab, chunk_bytes):
            shifted = x[r, s] - m[r, s, None]  # [chunk, n]
            bad = torch.isnan(shifted).sum(-1)
            if masked:  # top_k's -inf on purpose: p log p = 0 there (sampling.token_entropy's clamp)
                bad += torch.isposinf(x[r, s]).sum(-1)
                shifted.clamp_(min=FLOAT32_LOWEST)
            else:
                bad += (~torch.isfinite(x[r, s])).sum(-1)
            e = torch.exp(shifted)
            stats[0, r, s] = e.sum(-1)
            stats[1, r, s] = e.mul_(shifted).sum(-1)
            stats[2, r, s] = bad.float()
            del shifted, e
    all_reduce(stats, group)
    total = stats[0]
    entropy = torch.log(total) - stats[1] / total
    entropy = torch.where(stats[2] > 0, float("nan"), entropy)
    check_finite(entropy)  # every rank alike, before any row draws

    # the noise a chunk of positions at a time, each [chunk, V] within 1 / N of the chunk budget, so that a
    # rank's temporaries shrink with N like its logits (any chunking draws the same numbers on the CPU)
    noise_budget = max(4 * vocab, (chunks.CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // dist.get_world_size(group))
    state = torch.empty(x.shape, dtype=plan.state_dtype, device=x.device) if plan.keep_probs else None
    draw_keys = torch.zeros(rows, length, dtype=torch.int64, device=x.device)
    probs_rows, logp_rows = {}, {}
    for r in range(rows):
        generator = None if r in plan.gather_probs else generators[r]
        parts = (noise_columns(generator, length, vocab, v0, v1, x.device, noise_budget) if generator is not None
                 else ((s, None) for s in position_slices(length, vocab, noise_budget)))
        for s, q in parts:  # the softmax over the whole vocabulary, on this rank's columns
            p = torch.exp(x[r, s] - m[r, s, None]).div_(total[r, s, None])  # [chunk, n] float32
            if state is not None:
                state[r, s] = p
            if q is not None:
                draw_keys[r, s] = max_key(p.div_(q), v0)
            del p, q
        if r in plan.gather_probs:
            probs_rows[r] = torch.exp(x[r] - m[r, :, None]).div_(total[r, :, None])
        if r in plan.gather_log_probs:
            logp_rows[r] = x[r] - m[r, :, None] - torch.log(total[r, :, None])
    all_reduce(draw_keys, group, dist.ReduceOp.MAX)
    probs = _gather_rows(plan.gather_probs, probs_rows, vocab_slice, group)
    log_probs = _gather_rows(plan.gather_log_probs, logp_rows, vocab_slice, group)
    del probs_rows, logp_rows
    if state is None:  # the plain path keeps the processed logits, in the model's dtype (as the runner does)
        state = x.to(plan.state_dtype)
    return SliceOutcome(argmax, entropy, key_index(draw_keys), state, probs, log_probs, vocab)


def max_key_rows(x: torch.Tensor, v0: int) -> torch.Tensor:
    """[R, C] order keys of each position's max over the slice, a row at a time."""
    return torch.stack([max_key(x[r], v0) for r in range(x.shape[0])]) if x.shape[0] else \
        torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)


# ---------------------------------------------------------------------------------------------- rank 0
def draws_with_generator(draws) -> bool:
    """Whether a row's proposals are `GeneratorDraws`' own (torch.multinomial from its generator), so that
    every rank can draw its columns of the noise; a subclass overriding `proposals` (a replay, a fault
    injector) gets the whole probabilities on rank 0 instead."""
    from ..sampling import GeneratorDraws, _defined_by

    return (isinstance(draws, GeneratorDraws)
            and _defined_by(draws, "proposals_from_logits") is _defined_by(draws, "proposals") is not None)


def plan_step(temperatures: torch.Tensor, draws: list, greedy: list[bool] | None, top_k: list[int] | None,
              log_prob_rows: list[int], keep_probs: bool, state_dtype: torch.dtype
              ) -> tuple[SamplePlan, list[torch.Generator | None]]:
    """Rank 0: the plan of one step, and the generators rank 0 draws with (the rows' own)."""
    states, generators, gather = [], [], []
    for r, d in enumerate(draws):
        if greedy and greedy[r]:
            states.append(None)
            generators.append(None)
        elif draws_with_generator(d):
            states.append(d.generator.get_state())
            generators.append(d.generator)
        else:
            states.append(None)
            generators.append(None)
            gather.append(r)
    plan = SamplePlan(temperatures.float().cpu(), list(top_k) if top_k else None, states, gather,
                      list(log_prob_rows), keep_probs, state_dtype)
    return plan, generators


def worker_generators(plan: SamplePlan, device: torch.device) -> list[torch.Generator | None]:
    """A worker: a generator at each drawing row's state (a copy of rank 0's row generator)."""
    out = []
    for state in plan.draw_states:
        if state is None:
            out.append(None)
            continue
        g = torch.Generator(device=device)
        g.set_state(state)
        out.append(g)
    return out


def finish_step(local: SliceOutcome, plan: SamplePlan, entropy_bounds: torch.Tensor, draws: list,
                canvas_index: list[int], step_index: list[int], greedy: list[bool] | None,
                clamp_tokens: torch.Tensor | None, clamp_mask: torch.Tensor | None):
    """Rank 0, after the collectives: acceptance, the proposals of rows drawn here, the re-noising draws,
    clamps; the `FusedStepOutcome` of `fused_denoise_step` (`processed_logits` / `sc_probs`: rank 0's
    slices). Nothing here talks to the other ranks, so an exception here fails rows, not the engine."""
    from ..fast_sampling import FusedStepOutcome
    from ..sampling import entropy_bound_accept, free_mean_entropy, pin

    entropy, argmax = local.entropy, local.argmax
    rows, length = argmax.shape
    accept = entropy_bound_accept(entropy, entropy_bounds.to(entropy.device), clamp_mask)
    proposals = []
    for r, d in enumerate(draws):
        if greedy and greedy[r]:
            proposals.append(argmax[r])
        elif r in local.probs:
            proposals.append(d.proposals(local.probs[r], canvas_index[r], step_index[r]).to(argmax.device))
        else:
            proposals.append(local.drawn[r])
    proposals = torch.stack(proposals)
    noise = torch.stack([d.noise(length, local.vocab, canvas_index[r], step_index[r]) for r, d in enumerate(draws)])
    next_canvas = torch.where(accept, proposals, noise.to(argmax.device))
    state = local.state
    return FusedStepOutcome(pin(next_canvas, clamp_tokens, clamp_mask), pin(argmax, clamp_tokens, clamp_mask), accept,
                            free_mean_entropy(entropy, clamp_mask), None if plan.keep_probs else state,
                            state if plan.keep_probs else None)
