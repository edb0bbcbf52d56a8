"""Fast paths for the decoder step, beside the plain ones in `layers.py` / `diffusion_gemma.py`.

Each piece here computes what a plain piece computes and is tested against it (tests/test_fast_path.py):

- MoE (`moe_forward`, in moe.py): the (token, expert) pairs are sorted by expert once, then the experts run as one
  grouped matmul over the sorted buffer instead of a Python loop with a `torch.where` per expert.
  Methods: "grouped_mm" (`torch._grouped_mm`; no host sync, so it also traces under `torch.compile`),
  "sorted" (one sort, then per-expert slices of the sorted buffer: a loop without per-expert searches),
  "bmm" (experts padded to the busiest one's count, two `bmm`s) and "loop" (the plain path).
  "auto" picks "grouped_mm" where torch has it for the device and dtype, else "sorted" (measured on CPU:
  benchmarks/roofline.py --moe and BENCHMARKS.md).
- Decoder attention (`decoder_attention`): every query of a canvas row sees the same keys, so instead of a
  boolean mask over the whole cache the keys are *sliced*: from the first position any row may see (the
  sliding window start) to the end. No mask at all when every row sees the same span (batch 1, or rows
  with equal lengths); a [B, 1, 1, keys] mask only when rows differ. Consecutive slots of a contiguous
  cache are sliced, not gathered; a paged cache gathers the blocks of that span.
- `compile_layers`: `torch.compile` of each decoder/encoder layer (see its docstring for what it buys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import KVCache, PagedKVCache, contiguous_rows, visible_from
from ..config import SLIDING
from .layers import Experts, apply_rope
from .moe import MOE_METHODS, grouped_mm_supported, moe_forward, resolve_moe_method, sort_by_expert  # noqa: F401

IMPLS = ("plain", "fast")


# --------------------------------------------------------------------------------------------- attention
def decoder_attention(model, cache: KVCache | PagedKVCache, slots: torch.Tensor, base: torch.Tensor, canvas: int):
    """Masks and a KV source for `denoise` that read only the cached span some row can see.

    Returns (masks: layer type -> [B, 1, 1, keys] bool or None, kv_source). Row b's canvas sees cached
    positions [visible_from(base_b), base_b) and the whole canvas: the plain `_decoder_mask` semantics."""
    key_len = int(base.max()) if base.numel() else 0
    rows = contiguous_rows(slots)
    uniform = bool((base == base[0]).all()) if base.numel() else True
    spans: dict[str, int] = {}
    masks: dict[str, torch.Tensor | None] = {}
    for layer_type in set(model.text_config.layer_types):
        window = model.text_config.sliding_window if layer_type == SLIDING else None
        first = visible_from(base, window)  # [B]
        start = int(first.min()) if base.numel() else 0
        spans[layer_type] = start
        if uniform:
            masks[layer_type] = None  # every row sees exactly [start, key_len) + the canvas
        else:
            kp = torch.arange(start, key_len, device=base.device)[None, :]
            cached = (kp < base[:, None]) & (kp >= first[:, None])
            canvas_part = torch.ones(base.shape[0], canvas, dtype=torch.bool, device=base.device)
            masks[layer_type] = torch.cat([cached, canvas_part], dim=1)[:, None, None, :]
    layer_types = model.text_config.layer_types

    def kv_source(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = spans[layer_types[layer_idx]]
        keys, values = cache.read(layer_idx, rows, start, key_len)
        return torch.cat([keys, k.transpose(1, 2)], dim=2), torch.cat([values, v.transpose(1, 2)], dim=2)

    return masks, kv_source


# ------------------------------------------------------------------------------------------- switching
def apply_fast_path(model, moe: str = "auto", attention: bool = True) -> None:
    """Switch `model` (in place) to the fast MoE method and the sliced decoder attention. Weights are not
    touched; `apply_plain_path` switches back."""
    for layer in model.layers:
        switch_fast_experts(layer.experts, moe)
    model.fast_attention = attention


def switch_fast_experts(experts, moe: str = "auto") -> None:
    """Float experts take the fast MoE method; quantized ones (`quant.QuantExperts`, not imported: quant
    imports this package) run grouped on a GPU, where per-expert launches bound the step, and stay sorted on
    a CPU, where the per-expert int8 / int4 kernels beat dequantizing every expert each step. Experts of a
    sharded model sit inside `ParallelExperts` (`.inner`)."""
    experts = getattr(experts, "inner", experts)
    if isinstance(experts, Experts):
        experts.impl = resolve_moe_method(moe, experts.gate_up_proj.device, experts.gate_up_proj.dtype)
    elif hasattr(experts, "forward_grouped"):
        device = next(experts.buffers()).device
        grouped = (device.type == "cuda" and moe in ("auto", "grouped_mm")
                   and grouped_mm_supported(device, experts.gate_up.compute_dtype))
        experts.impl = "grouped" if grouped else "sorted"


def apply_plain_path(model) -> None:
    for layer in model.layers:
        experts = getattr(layer.experts, "inner", layer.experts)
        if isinstance(experts, Experts):
            experts.impl = "loop"
        elif hasattr(experts, "forward_grouped"):
            experts.impl = "sorted"
    model.fast_attention = False


def prepare(model, impl: str = "plain", quantization: str | None = None, compile: bool | str = False,
            moe: str = "auto") -> None:
    """What `LLM` does after loading: quantize (letterpress.quant), switch to the fast path, compile."""
    from ..errors import RequestError
    from ..quant import quantize_model

    if impl not in IMPLS:
        raise RequestError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    quantize_model(model, quantization)
    if impl == "fast":
        apply_fast_path(model, moe=moe)
    if compile:
        compile_layers(model, mode=None if compile is True else compile)


# ----------------------------------------------------------------------------------------------- compile
def layer_qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`Layer.forward` up to the attention itself: x [B, T, H] -> q [B, heads, T, d], k, v [B, T, kvh, d]."""
    attn = layer.self_attn
    b, t, _ = x.shape
    h = layer.input_layernorm(x)
    q = apply_rope(attn.q_norm(attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim)), cos, sin)
    k_raw = attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim) if attn.v_proj is not None else k_raw
    return q.transpose(1, 2), apply_rope(attn.k_norm(k_raw), cos, sin), attn.v_norm(v)


def layer_rest(layer, x: torch.Tensor, attn_out: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """`Layer.forward` after the attention: output projection, dense MLP, MoE, norms, residuals."""
    b, t, _ = x.shape
    attn = layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
    x = x + layer.post_attention_layernorm(attn)
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(x)))
    flat = x.reshape(-1, x.shape[-1])
    weights, index = layer.router(flat)
    moe = layer.experts(layer.pre_feedforward_layernorm_2(flat), weights, index).reshape(x.shape)
    x = x + layer.post_feedforward_layernorm(dense + layer.post_feedforward_layernorm_2(moe))
    return x * scalar


class CompiledLayerForward:
    """A `Layer.forward` replacement: the work before and after the attention runs as two compiled graphs
    (shared by every layer of the same shape); the KV source and `scaled_dot_product_attention` stay
    eager, so growing caches and masks never trigger a recompile."""

    def __init__(self, layer, qkv, rest, copy_outputs: bool = False):
        """`copy_outputs`: under CUDA graphs a graph's outputs live in its memory pool and the next replay
        (the next layer's call of the same graph) overwrites them, so they are copied out first."""
        self.layer, self.qkv, self.rest, self.copy_outputs = layer, qkv, rest, copy_outputs

    def __call__(self, x, cos, sin, mask, kv_source, layer_idx, scalar):
        attn = self.layer.self_attn
        q, k, v = self.qkv(self.layer, x, cos, sin)
        if self.copy_outputs:
            q, k, v = q.clone(), k.clone(), v.clone()
        keys, values = kv_source(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                             enable_gqa=attn.num_heads != attn.num_kv_heads)
        out = self.rest(self.layer, x, out, scalar)
        return out.clone() if self.copy_outputs else out


def compile_layers(model, mode: str | None = None, dynamic: bool | None = None) -> None:
    """`torch.compile` the layers in place (weights untouched; `uncompile_layers` undoes it).

    Measured on CPU (BENCHMARKS.md): the first calls compile for tens of seconds; afterwards the gain is
    small because the step is dominated by matmuls and the sampler's random draws. On CUDA,
    mode="reduce-overhead" adds CUDA graphs to the compiled parts (their outputs copied out, see
    `CompiledLayerForward`; benchmarks/gpu_check.py times it on a GPU)."""
    qkv = torch.compile(layer_qkv, mode=mode, dynamic=dynamic)
    rest = torch.compile(layer_rest, mode=mode, dynamic=dynamic)
    graphs = bool(torch._inductor.list_mode_options(mode or "default").get("triton.cudagraphs"))  # max-autotune too
    for layer in model.layers:
        layer.forward = CompiledLayerForward(layer, qkv, rest, copy_outputs=graphs)


def uncompile_layers(model) -> None:
    for layer in model.layers:
        layer.__dict__.pop("forward", None)
