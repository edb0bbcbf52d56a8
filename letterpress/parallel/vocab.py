"""The vocabulary split over the ranks: the tied embedding, the LM head and the self-conditioning input
(vLLM's `VocabParallelEmbedding` / `ParallelLMHead`), and the order keys the sampler reduces.

Rank r of N holds rows [v0, v1) of the embedding: slices of ceil(V / N) tokens, the last one shorter when N
does not divide V (vLLM pads the table to a multiple instead; keeping the bounds, only the gathers to rank 0
need padding, and they pad to ceil(V / N)).

    embed            a masked lookup of the ids inside [v0, v1) (0 elsewhere), all-reduced: each id's row
                     comes from the one rank that holds it, so the sum is exact
    lm_logits        the float32 logits of the rank's slice [.., v1 - v0], soft-capped there; nothing gathered
    soft_embeddings  softmax over the whole vocabulary from the per-position max (all-reduce MAX) and sum of
                     exponentials (all-reduce SUM), times the rank's slice of the embedding, all-reduced

Order keys: `order_key(values, index)` packs a float32 and a token id into one int64 whose maximum is the
largest value at its lowest id (torch.argmax's first occurrence), so "argmax over the whole vocabulary"
is one all-reduce MAX of a [rows, positions] int64 tensor instead of a gather of [rows, positions, vocab].
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..chunks import position_slices
from ..errors import NotSupportedError

LOW_BITS = 0xFFFFFFFF


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's slice [v0, v1) of the vocabulary: ceil(vocab / world) tokens, the last slice shorter."""
    size = math.ceil(vocab / world)
    if size * (world - 1) >= vocab:
        raise NotSupportedError(f"--tensor-parallel-size {world} leaves a rank without vocabulary (vocab {vocab})")
    return min(rank * size, vocab), min((rank + 1) * size, vocab)


def order_key(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (value, -index): float32 `values` (any sign; -0.0 counts as 0.0, nan above
    everything, as in torch.argmax) and token ids `index` < 2^32, same shape."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return monotone * (LOW_BITS + 1) + (LOW_BITS - index.long())


def key_index(keys: torch.Tensor) -> torch.Tensor:
    """The token ids of `order_key` keys."""
    return LOW_BITS - (keys & LOW_BITS)


def key_value(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values of `order_key` keys."""
    monotone = torch.div(keys, LOW_BITS + 1, rounding_mode="floor")
    bits = torch.where(monotone < 0, monotone ^ 0x7FFFFFFF, monotone)
    return bits.to(torch.int32).view(torch.float32)


def max_key(x: torch.Tensor, v0: int) -> torch.Tensor:
    """x [.., n] (a slice of the vocabulary starting at id v0) -> order keys of its max [..], one pass."""
    values, index = x.max(dim=-1)
    return order_key(values, index + v0)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def global_softmax_stats(flat: torch.Tensor, group, chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [P, n] a slice of each position's logits -> (max [P], sum of exp(x - max) [P]) over the whole
    vocabulary (two all-reduces of [P] float32)."""
    m = all_reduce(flat.amax(-1).float(), group, dist.ReduceOp.MAX)
    s = torch.empty_like(m)
    for sl in position_slices(flat.shape[0], flat.shape[-1], chunk_bytes):
        s[sl] = torch.exp(flat[sl].float() - m[sl, None]).sum(-1)
    return m, all_reduce(s, group)


def install_vocab_parallel(model, shard) -> None:
    """Replace the model's `embed`, `lm_logits` and `soft_embeddings` (instance attributes; the class's
    stay) by their vocabulary-parallel forms (module docstring). `model.embed_tokens` must already hold this
    rank's rows [v0, v1) (shard.shard_model cuts it); `model.vocab_slice` records (v0, v1, vocab)."""
    cfg = model.text_config
    vocab = cfg.vocab_size
    v0, v1 = vocab_range(vocab, shard.rank, shard.world)
    group = shard.group
    model.vocab_slice = (v0, v1, vocab)

    def scale() -> torch.Tensor:  # rounded to the weight dtype first, as DiffusionGemma.embed
        return torch.tensor(cfg.hidden_size**0.5).to(model.dtype)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= v0) & (ids < v1)
        out = F.embedding(torch.where(inside, ids - v0, 0), model.embed_tokens.weight)
        out.masked_fill_(~inside[..., None], 0)
        return all_reduce(out, group) * scale()

    def lm_logits(hidden: torch.Tensor) -> torch.Tensor:
        """[.., hidden] -> this rank's float32 soft-capped logits [.., v1 - v0], a chunk of positions at a
        time (the same ops as DiffusionGemma.lm_logits, on the slice)."""
        cap = cfg.final_logit_softcapping
        weight = model.embed_tokens.weight
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(flat.shape[0], v1 - v0, dtype=torch.float32, device=hidden.device)
        for s in position_slices(flat.shape[0], v1 - v0):
            chunk = F.linear(flat[s], weight).float()
            if cap:
                torch.tanh(chunk.div_(cap), out=out[s]).mul_(cap)
            else:
                out[s] = chunk
            del chunk
        return out.reshape(*hidden.shape[:-1], v1 - v0)

    def soft_embeddings(logits: torch.Tensor | None, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Self-conditioning input from this rank's slice of the previous step's processed logits (softmax
        over the whole vocabulary through `global_softmax_stats`) or of their softmax (`probs`, the fused
        sampler's): partial products with the rank's embedding rows, all-reduced: [.., hidden]."""
        source = probs if probs is not None else logits
        weight = model.embed_tokens.weight
        flat = source.reshape(-1, source.shape[-1])
        if probs is None:
            m, total = global_softmax_stats(flat, group)
        out = torch.empty(flat.shape[0], weight.shape[1], dtype=model.dtype, device=source.device)
        for s in position_slices(flat.shape[0], flat.shape[-1]):
            chunk = flat[s] if probs is not None else torch.exp(flat[s].float() - m[s, None]).div_(total[s, None])
            out[s] = chunk.to(model.dtype) @ weight
            del chunk
        return (all_reduce(out, group) * scale()).reshape(*source.shape[:-1], weight.shape[1])

    model.embed = embed
    model.lm_logits = lm_logits
    model.soft_embeddings = soft_embeddings
