"""Split a loaded DiffusionGemma over the ranks of a process group, in place (tensor and expert parallel).

Every rank builds the whole model, then keeps its slice of each weight and swaps in small modules that add
the collectives (`shard_model`). The cuts are Megatron's, as vLLM makes them:

    attention   q/k/v column-parallel (heads split); with fewer KV heads than ranks each rank keeps the one
                KV head its query heads read (replicated, vLLM's `num_kv_head_replicas`); o_proj row-parallel
                + all-reduce
    dense MLP   gate/up column-parallel, down row-parallel + all-reduce (also the self-conditioning block)
    experts     tensor parallel (default): every expert's intermediate split, + all-reduce;
                expert parallel (`expert_parallel`): whole experts per rank, each rank runs the pairs routed
                to its own experts, then all-reduce of the combined output
    embedding   vocabulary-parallel (tied with the LM head): each rank keeps ceil(V / N) rows; the lookup,
                the LM head and the self-conditioning input run on the slice (vocab.py)
    router, norms: replicated

Plain collectives (`torch.distributed.all_reduce`, `gather`, `broadcast`), not DTensor: the forward code
reshapes by head counts, the experts are packed 3-D weights or quantized `QuantWeight` buffers (int4 packed
two per byte), replicated KV heads are no DTensor placement, and inference wants no per-op dispatch. Three
all-reduces per layer, each where Megatron puts one; the sampler's vocabulary passes reduce per-position
statistics instead of gathering the logits (sampler.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..config import LayerSpec
from ..errors import NotSupportedError
from .vocab import install_vocab_parallel, vocab_range


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's place: `rank` of `world`; `expert_parallel` splits experts by id instead of by width.
    `group`: the process group of the model's collectives (None: the default group)."""

    rank: int
    world: int
    expert_parallel: bool = False
    group: object = None

    def split(self, n: int, what: str) -> tuple[int, int]:
        """An even split of `n` items (heads, channels) over the ranks: this rank's [start, end)."""
        if n % self.world:
            raise NotSupportedError(f"--tensor-parallel-size {self.world} does not divide {what} ({n})")
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


def kv_heads_of(rank: int, world: int, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """The KV heads [start, end) that rank's query heads read. With at least as many KV heads as ranks they
    are split; with fewer, each rank keeps one (ranks r * kv // world share it), as vLLM replicates them."""
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise NotSupportedError(f"--tensor-parallel-size {world} does not divide the KV heads ({num_kv_heads})")
        size = num_kv_heads // world
        return rank * size, (rank + 1) * size
    if world % num_kv_heads:
        raise NotSupportedError(f"--tensor-parallel-size {world} is not a multiple of the KV heads ({num_kv_heads})")
    head = rank * num_kv_heads // world
    return head, head + 1


# ------------------------------------------------------------------------------------------- slicing
def _slice_quant(qw, axis: str, ranges: list[tuple[int, int]]):
    """A `QuantWeight` holding only `ranges` (concatenated) of its output channels (axis "out"), input
    channels ("in") or experts ("expert"). Works on the stored parts, so nothing is dequantized."""
    from ..quant import QuantWeight

    if qw.kernel == "int4pack_cpu":
        raise NotSupportedError("tensor parallel over int4 weights repacked for the CPU kernel (bf16/fp16 on CPU) "
                                "is not supported: use --quantization int8 or fp8, or float32")
    names = {"int8": ("q", "scale"), "fp8": ("q", "scale"), "int4": ("packed", "scale", "zero"),
             "nvfp4": ("packed", "scale", "global_scale")}[qw.fmt]
    parts = {n: getattr(qw, n) for n in names}
    *lead, n_out, k_in = qw.shape
    shape = list(qw.shape)

    def cut(t: torch.Tensor, dim: int, per: int) -> torch.Tensor:
        pieces = []
        for start, end in ranges:
            if start % per or end % per:
                raise NotSupportedError(
                    f"cannot split this checkpoint's {qw.fmt} weight of shape {list(qw.shape)} at [{start}, {end}) of "
                    f"its {axis} axis: its groups are {per} wide; load a float checkpoint with --quantization "
                    f"{qw.fmt} (each rank then quantizes its own slice) or use another --tensor-parallel-size")
            pieces.append(t.narrow(dim, start // per, (end - start) // per))
        return torch.cat(pieces, dim).contiguous()

    out = {}
    for name, t in parts.items():
        if name == "global_scale":
            out[name] = t
        elif axis == "expert":
            out[name] = cut(t, 0, 1)
        elif axis == "out":
            per_channel = name == "scale" and t.ndim == len(qw.shape) - 1
            out[name] = cut(t, -1 if per_channel else -2, 1)
        else:  # in: packed nibbles are 2 per byte, group-wise scales one per group
            if name in ("q",):
                out[name] = cut(t, -1, 1)
            elif name == "packed":
                out[name] = cut(t, -1, 2)
            elif t.ndim == len(qw.shape):  # [.., N, K / group]
                out[name] = cut(t, -1, k_in // t.shape[-1])
            else:  # per-output-channel scale: the same for any slice of the inputs
                out[name] = t
    size = sum(end - start for start, end in ranges)
    shape[{"expert": 0, "out": -2, "in": -1}[axis]] = size
    new = QuantWeight(None, None, qw.group, compute_dtype=qw.compute_dtype, shape=tuple(shape))
    new.load_parts(out, fmt=qw.fmt)
    return new


def _slice_weight(w: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> nn.Parameter:
    """The parameter holding `ranges` of `w` along `dim`; it remembers them (`source_slice`), so that a model
    cut on the meta device can read just those ranges from the checkpoint (`slice_plan`)."""
    p = nn.Parameter(torch.cat([w.narrow(dim, s, e - s) for s, e in ranges], dim).contiguous(), requires_grad=False)
    p.source_slice = (dim, list(ranges))
    return p


def slice_plan(model) -> dict[str, tuple[str, int | None, list[tuple[int, int]] | None]]:
    """For every parameter of a sharded model: (its name in the unsharded model, the dim it was cut along
    or None when it is whole, the ranges kept). The wrappers add `.linear` / `.inner` to the names."""
    plan = {}
    for name, p in model.named_parameters():
        full = name.replace(".linear.", ".").replace(".inner.", ".")
        dim, ranges = getattr(p, "source_slice", (None, None))
        plan[name] = (full, dim, ranges)
    return plan


def column_parallel(linear: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """Keep the output channels `ranges` of a linear layer (float or `QuantLinear`)."""
    from ..quant import QuantLinear

    size = sum(e - s for s, e in ranges)
    if isinstance(linear, QuantLinear):
        linear.qweight = _slice_quant(linear.qweight, "out", ranges)
        linear.out_features = size
        return linear
    linear.weight = _slice_weight(linear.weight.detach(), 0, ranges)
    if linear.bias is not None:
        linear.bias = _slice_weight(linear.bias.detach(), 0, ranges)
    linear.out_features = size
    return linear


class RowParallelLinear(nn.Module):
    """A linear layer holding input channels [start, end): its partial products are summed over the ranks
    (one all-reduce), then the bias is added once."""

    def __init__(self, linear: nn.Module, start: int, end: int, shard: Shard):
        super().__init__()
        from ..quant import QuantLinear

        self.shard = shard
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if isinstance(linear, QuantLinear):
            linear.qweight = _slice_quant(linear.qweight, "in", [(start, end)])
        else:
            linear.weight = _slice_weight(linear.weight.detach(), 1, [(start, end)])
            linear.bias = None
        linear.in_features = end - start
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shard.all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias


class ParallelExperts(nn.Module):
    """The experts of one layer on this rank. Tensor parallel: every expert's intermediate slice, run on all
    pairs, summed over ranks. Expert parallel: experts [first, first + count), run on the (token, expert)
    pairs routed to them; the other ranks run the rest and one all-reduce adds the outputs.

    Why an all-reduce and not vLLM's all-to-all: every rank already holds every token (attention is tensor
    parallel, so the activations are replicated after each all-reduce) and the router runs everywhere, so
    there is nothing to dispatch: each rank picks its pairs locally and one all-reduce of [tokens, hidden]
    combines them, the same volume the dense MLP's all-reduce moves. An all-to-all pays off when ranks hold
    different tokens (data-parallel attention): vLLM too uses its all-to-all kernels only with data
    parallelism (`use_all2all_kernels`: dp_size > 1) and all-reduces for TP + EP, as here."""

    def __init__(self, inner: nn.Module, shard: Shard, first: int, count: int):
        super().__init__()
        self.inner, self.shard, self.first, self.count = inner, shard, first, count

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.shard.expert_parallel:
            return self.shard.all_reduce(self.inner(x, weights, index))
        mine = (index >= self.first) & (index < self.first + self.count)  # [N, k]
        token, slot = torch.where(mine)
        out = torch.zeros_like(x)
        if token.numel():
            y = self.inner(x[token], weights[token, slot, None], (index[token, slot] - self.first)[:, None])
            out.index_add_(0, token, y)
        return self.shard.all_reduce(out)


# --------------------------------------------------------------------------------------------- layers
def _shard_attention(attn: nn.Module, spec: LayerSpec, num_heads: int, shard: Shard) -> None:
    d = attn.head_dim
    q0, q1 = shard.split(num_heads, "the attention heads")
    k0, k1 = kv_heads_of(shard.rank, shard.world, num_heads, spec.num_kv_heads)
    column_parallel(attn.q_proj, [(q0 * d, q1 * d)])
    column_parallel(attn.k_proj, [(k0 * d, k1 * d)])
    if attn.v_proj is not None:
        column_parallel(attn.v_proj, [(k0 * d, k1 * d)])
    attn.o_proj = RowParallelLinear(attn.o_proj, q0 * d, q1 * d, shard)
    attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0


def _shard_gated(mlp: nn.Module, shard: Shard, what: str) -> None:
    """GatedMLP or SelfConditioning: gate/up column-parallel, down row-parallel."""
    i0, i1 = shard.split(mlp.gate_proj.out_features, what)
    column_parallel(mlp.gate_proj, [(i0, i1)])
    column_parallel(mlp.up_proj, [(i0, i1)])
    mlp.down_proj = RowParallelLinear(mlp.down_proj, i0, i1, shard)


def _shard_experts(experts: nn.Module, shard: Shard) -> ParallelExperts:
    from ..quant import QuantExperts

    num = experts.num_experts
    if shard.expert_parallel:
        e0, e1 = shard.split(num, "the experts (expert parallel)")
        if isinstance(experts, QuantExperts):
            experts.gate_up = _slice_quant(experts.gate_up, "expert", [(e0, e1)])
            experts.down = _slice_quant(experts.down, "expert", [(e0, e1)])
        else:
            experts.gate_up_proj = _slice_weight(experts.gate_up_proj.detach(), 0, [(e0, e1)])
            experts.down_proj = _slice_weight(experts.down_proj.detach(), 0, [(e0, e1)])
        experts.num_experts = e1 - e0
        return ParallelExperts(experts, shard, e0, e1 - e0)
    if isinstance(experts, QuantExperts):
        inter = experts.gate_up.shape[-2] // 2
        i0, i1 = shard.split(inter, "the experts' intermediate size")
        experts.gate_up = _slice_quant(experts.gate_up, "out", [(i0, i1), (inter + i0, inter + i1)])
        experts.down = _slice_quant(experts.down, "in", [(i0, i1)])
    else:
        inter = experts.down_proj.shape[-1]
        i0, i1 = shard.split(inter, "the experts' intermediate size")
        experts.gate_up_proj = _slice_weight(experts.gate_up_proj.detach(), 1, [(i0, i1), (inter + i0, inter + i1)])
        experts.down_proj = _slice_weight(experts.down_proj.detach(), 2, [(i0, i1)])
    return ParallelExperts(experts, shard, 0, num)


def local_layer_specs(specs: list[LayerSpec], num_heads: int, world: int) -> list[LayerSpec]:
    """The layer shapes one rank holds: its KV heads per layer (what its paged KV cache stores)."""
    local = []
    for spec in specs:
        k0, k1 = kv_heads_of(0, world, num_heads, spec.num_kv_heads)
        local.append(dataclasses.replace(spec, num_kv_heads=k1 - k0))
    return local


@torch.no_grad()
def shard_model(model, shard: Shard):
    """Cut `model` (a loaded DiffusionGemma, float or quantized) down to this rank's slice, in place; see the
    module docstring. The model's `text_config` becomes the local one (KV heads per rank), so its caches
    hold only the local heads. Returns the model."""
    if shard.world == 1:
        return model
    cfg = model.text_config
    for layer, spec in zip(model.layers, cfg.layers):
        _shard_attention(layer.self_attn, spec, cfg.num_attention_heads, shard)
        _shard_gated(layer.mlp, shard, "the dense MLP's intermediate size")
        layer.experts = _shard_experts(layer.experts, shard)
    _shard_gated(model.self_conditioning, shard, "the self-conditioning block's intermediate size")
    model.text_config = dataclasses.replace(cfg, layers=local_layer_specs(cfg.layers, cfg.num_attention_heads, shard.world))
    v0, v1 = vocab_range(cfg.vocab_size, shard.rank, shard.world)
    model.embed_tokens.weight = _slice_weight(model.embed_tokens.weight.detach(), 0, [(v0, v1)])
    model.embed_tokens.num_embeddings = v1 - v0
    install_vocab_parallel(model, shard)
    model.shard = shard
    return model


def switch_fast_experts(model, moe: str = "auto") -> None:
    """`fast.apply_fast_path` for a sharded model (its experts sit inside `ParallelExperts`)."""
    from ..model.fast import switch_fast_experts as switch

    for layer in model.layers:
        switch(layer.experts, moe)
    model.fast_attention = True
