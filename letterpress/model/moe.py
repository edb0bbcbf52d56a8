"""The packed-expert MoE kernels: the fast methods `Experts.forward` (layers.py) switches to, and the expert sort
that the quantized experts (letterpress.quant) share. Beside the plain loop in `layers.Experts`, tested against it
(tests/test_fast_path.py); `fast.py` says which method is picked where and why.

Imports only torch, so that `layers.py` and `letterpress.quant` can both use it without importing each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MOE_METHODS = ("auto", "grouped_mm", "sorted", "bmm", "loop")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# --------------------------------------------------------------------------------------------------- MoE
def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """`torch._grouped_mm` runs on CPU for float dtypes (checked on torch 2.13); on CUDA bf16 on SM >= 8.0 (run on an H200)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def resolve_moe_method(method: str, device: torch.device, dtype: torch.dtype) -> str:
    if method not in MOE_METHODS:
        raise ValueError(f"unknown MoE method {method!r}; choose one of {', '.join(MOE_METHODS)}")
    if method == "auto":
        return "grouped_mm" if grouped_mm_supported(device, dtype) else "sorted"
    return method


def sort_by_expert(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """index: [N, k] expert ids -> (order [N*k] flat pair ids sorted by expert (stable, so tokens ascend
    within an expert), token [N*k] the token of each sorted pair, counts [E] pairs per expert)."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # histc instead of bincount: no data-dependent output size, so it traces (CPU histc wants floats)
    source = flat.float() if flat.device.type == "cpu" else flat.int()
    counts = torch.histc(source, bins=num_experts, min=0, max=num_experts - 1).to(torch.int64)
    return order, order // index.shape[1], counts


@torch.library.custom_op("letterpress::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` as an opaque op for `torch.compile`: its fake (meta) kernel only accepts bf16,
    so float32 CPU graphs would otherwise break at it."""
    return torch._grouped_mm(x, w, offs=offsets)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, num_experts: int,
                    gate_up_mm, down_mm) -> torch.Tensor:
    """The grouped MoE with its two grouped matmuls given: `gate_up_mm(xs, offsets)` [M, H] -> [M, 2I] and
    `down_mm(hs, offsets)` [M, I] -> [M, H] over rows sorted by expert (offsets [E] int32: each expert's end
    row). x [N, H]; weights, index [N, k] -> [N, H], accumulated as `moe_forward` does."""
    order, token, counts = sort_by_expert(index, num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate, up = gate_up_mm(x[token], offsets).chunk(2, dim=-1)
    ys = down_mm(_gelu_tanh(gate) * up, offsets)
    ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def moe_forward(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                index: torch.Tensor, method: str) -> torch.Tensor:
    """Packed experts gate_up [E, 2I, H], down [E, H, I]; x [N, H]; weights, index [N, k] -> [N, H].

    Accumulates like the plain path (an `index_add_` in x's dtype, experts in ascending order per token)."""
    num_experts = gate_up.shape[0]
    order, token, counts = sort_by_expert(index, num_experts)
    xs = x[token]  # [N*k, H] sorted by expert
    if method == "grouped_mm":
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        mm = _grouped_mm_op if torch.compiler.is_compiling() else (lambda a, b, o: torch._grouped_mm(a, b, offs=o))
        gate, up = mm(xs, gate_up.transpose(-2, -1), offsets).chunk(2, dim=-1)
        ys = mm(_gelu_tanh(gate) * up, down.transpose(-2, -1), offsets)
    elif method == "sorted":
        ys = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts.tolist()):  # one host sync for all experts
            if n:
                gate, up = F.linear(xs[start:start + n], gate_up[expert]).chunk(2, dim=-1)
                ys[start:start + n] = F.linear(_gelu_tanh(gate) * up, down[expert])
                start += n
    elif method == "bmm":
        expert_sorted = index.reshape(-1)[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(order.numel(), device=x.device) - starts[expert_sorted]
        padded = x.new_zeros(num_experts, int(counts.max()), x.shape[-1])
        padded[expert_sorted, slot] = xs
        gate, up = torch.bmm(padded, gate_up.transpose(-2, -1)).chunk(2, dim=-1)
        ys = torch.bmm(_gelu_tanh(gate) * up, down.transpose(-2, -1))[expert_sorted, slot]
    else:
        raise ValueError(f"moe_forward: unknown method {method!r}")
    ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)
