"""The most probable canvas the automaton accepts: dynamic programming over (position, state) (DINGO,
arXiv 2505.23061), with an end: the answer may stop before the canvas does.

Given a canvas's per-position scores `logp` [L, V] (log-probabilities, possibly Gumbel-perturbed for a
sample), find tokens x_0..x_{L-1} maximizing sum_i logp[i, x_i] such that the automaton, started in `start`,
reads x_0.. and either
- writes an accepted text, then one EOS token, then anything (the runner cuts the canvas at its first EOS,
  so what follows is never committed: each position then takes its own best token), or
- is still in a state from which an accepted text is at most `room` more tokens away (a canvas that the next
  one continues; `room` None: the token budget ends with this canvas, so the text must be accepted here).
That is the commit-time condition of Mündler et al. (arXiv 2508.10111), "this prefix can still complete",
made exact by the automaton's distances, and it holds for every canvas the DP returns.

Cost per position: one gather and one scatter-max over the E edges, plus [V] for the after-EOS row maxima;
the backpointers are [L, S + 1] longs. Plain PyTorch; runs where `logp` lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .automaton import TokenAutomaton

NEG = float("-inf")
_GATHER_ELEMENTS = 2**24  # at most this many [positions, E] edge scores at a time (64 MB of float32)


@dataclass
class Path:
    tokens: torch.Tensor  # [L] long
    end_state: int  # the automaton state after the tokens (-1: an EOS was written)
    score: float


def best_path(logp: torch.Tensor, automaton: TokenAutomaton, start: int, eos_token_ids: list[int],
              room: int | None) -> Path:
    """logp: [L, V] float32. See the module docstring. Raises ValueError if no canvas can satisfy the end
    condition (the caller checks the token budget against `automaton.distance` beforehand)."""
    length, _ = logp.shape
    device = logp.device
    a = automaton.to(device)
    states = a.num_states
    done = states  # the extra state "an EOS was written"
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    eos_score, eos_arg = (logp[:, eos].max(-1) if len(eos_token_ids) else
                          (torch.full((length,), NEG, device=device), torch.zeros(length, dtype=torch.long, device=device)))
    eos_token = eos[eos_arg] if len(eos_token_ids) else eos_arg
    row_max, row_arg = logp.max(-1)

    score = torch.full((states + 1,), NEG, device=device)
    score[start] = 0.0
    back = torch.empty((length, states + 1), dtype=torch.long, device=device)  # edge index, or -1/-2 (see below)
    edge_ids = torch.arange(a.src.numel(), device=device)
    accepting = torch.cat([a.accepting, torch.zeros(1, dtype=torch.bool, device=device)])
    edges = a.src.numel()
    none = torch.full((edges,), edges, dtype=torch.long, device=device)
    chunk = max(1, _GATHER_ELEMENTS // max(edges, 1))  # positions whose [chunk, E] edge scores are gathered at once
    for i in range(length):
        if i % chunk == 0:
            edge_logp = logp[i: i + chunk].index_select(1, a.token)  # [chunk, E]
        cand = score.index_select(0, a.src) + edge_logp[i % chunk]  # [E]
        new = torch.full((states + 1,), NEG, device=device).scatter_reduce(0, a.dst, cand, "amax")
        # the lowest edge index reaching each state's best (deterministic on every device)
        hit = (cand == new.index_select(0, a.dst)) & (cand > NEG)
        edge = torch.full((states + 1,), edges, dtype=torch.long, device=device)
        edge = edge.scatter_reduce(0, a.dst, torch.where(hit, edge_ids, none), "amin")
        # into "done": stay (any token: -1) or write an EOS after an accepted text (-2 - from_state)
        stay = score[done] + row_max[i]
        finals = torch.where(accepting, score, torch.full_like(score, NEG))
        best_final, best_from = finals.max(0)
        enter = best_final + eos_score[i]
        take_stay = stay >= enter  # a tensor, not a bool: no device sync per position
        new[done] = torch.where(take_stay, stay, enter)
        edge[done] = torch.where(take_stay, torch.full_like(best_from, -1), -2 - best_from)
        back[i] = edge
        score = new

    if room is None:
        allowed = accepting.clone()
    else:
        allowed = torch.cat([a.distance <= room, torch.zeros(1, dtype=torch.bool, device=device)])
    allowed[done] = True
    final = torch.where(allowed, score, torch.full_like(score, NEG))
    best, state = final.max(0)
    if not bool(best > NEG):
        raise ValueError("no canvas satisfies the constraint within the token budget")
    end_state = -1 if int(state) == done else int(state)

    tokens = [0] * length
    state = int(state)
    backs = back.tolist()
    src, tok = automaton.src, automaton.token  # on the CPU: L lookups
    any_token, eos_tokens = row_arg.tolist(), eos_token.tolist()
    for i in range(length - 1, -1, -1):
        e = backs[i][state]
        if state == done and e == -1:
            tokens[i] = any_token[i]
        elif state == done:
            tokens[i] = eos_tokens[i]
            state = -2 - e
        else:
            tokens[i] = int(tok[e])
            state = int(src[e])
    return Path(torch.tensor(tokens, dtype=torch.long, device=device), end_state, float(best))
