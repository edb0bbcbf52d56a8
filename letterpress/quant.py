"""Weight-only quantization: int8, group-wise int4 and fp8, for every linear layer and the packed experts.

    quantize_model(model, "int8" | "int4" | "fp8")       in place; `LLM(..., quantization=...)`,
                                                         `--quantization` on every command

Formats (W is a weight [.., N out, K in]; packed experts are [E, N, K] and quantize per expert):

- int8: per-output-channel symmetric, W ~ q * scale[n], q in [-127, 127]. 1 byte per weight.
- int4: group-wise asymmetric over `group` (64; the largest divisor of the input size up to 64) inputs, W ~ (q - 8) * scale + zero with
  q in [0, 15] (the convention of torch's int4 kernels), packed two per byte: byte = q[2i] | q[2i+1] << 4.
  4 bits + scale and zero per group, 16-bit in a bf16/fp16 model (4.5 bits per weight), 32-bit in float32.
- fp8: float8 e4m3 with a per-output-channel scale (|W| max -> 448). 1 byte per weight.

Compute. A quantized weight is used where it is needed: by a torch kernel that reads it directly when one
exists for the device, dtype and shape, otherwise by dequantizing into the activation dtype and calling
`F.linear` (always correct, never faster than float):

| format | CPU bf16/fp16 activations | CPU fp32 activations | CUDA (untested here) |
|---|---|---|---|
| int8 | `_weight_int8pack_mm` (K % 16 == 0) | dequantize + linear | dequantize + linear |
| int4 | `_weight_int4pack_mm_for_cpu` (N % 16, K % group) | dequantize + linear | dequantize + linear |
| fp8 | `_scaled_mm` with per-token fp8 activations (W8A8) | same | same kernel on SM >= 8.9 |

Not quantized: the embedding (tied with the LM head and read three ways: lookup, LM head, the
self-conditioning matmul over the vocabulary; ~3% of the 26B's weights), the router (its top-k choices
flip easily) and the norms. The model is loaded in float first and quantized layer by layer, so loading
peaks at the float model's size.
"""

from __future__ import annotations


import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NotSupportedError

FORMATS = ("int8", "int4", "fp8")
INT4_GROUP = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # keeps an all-zero row/group from dividing by zero


def check_format(fmt: str | None) -> str | None:
    if fmt in (None, "", "none"):
        return None
    if fmt not in FORMATS:
        raise NotSupportedError(f"unknown quantization {fmt!r}; choose one of {', '.join(FORMATS)} (or leave it unset)")
    return fmt


# ------------------------------------------------------------------------------------------------ formats
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., N, K] -> q int8 [.., N, K], scale float32 [.., N]."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=_TINY)
    return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[..., None].float()).to(dtype)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[.., N, K] -> packed uint8 [.., N, K/2], scale and zero float32 [.., N, K/group]."""
    *lead, n, k = w.shape
    if k % group or k % 2:
        raise ValueError(f"int4: the input size {k} must be a multiple of the group size {group} (and even)")
    groups = w.float().reshape(*lead, n, k // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=_TINY)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(*lead, n, k)
    zero = lo + 8 * scale  # so that W ~ (q - 8) * scale + zero = q * scale + lo
    return pack_int4(q), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [.., K] (K even) -> [.., K/2], two per byte: q[2i] | q[2i+1] << 4."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[.., K/2] uint8 -> [.., K] uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)
    *lead, n, k = q.shape
    group = k // scale.shape[-1]
    w = (q.float().reshape(*lead, n, k // group, group) - 8) * scale[..., None].float() + zero[..., None].float()
    return w.reshape(*lead, n, k).to(dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., N, K] -> q float8_e4m3fn [.., N, K], scale float32 [.., N]."""
    w = w.float()
    scale = (w.abs().amax(-1) / FP8_MAX).clamp(min=_TINY)
    return (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[..., None].float()).to(dtype)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scale)^T with x quantized per row to e4m3 (W8A8, as vLLM's FP8 does): one
    `torch._scaled_mm` call (CPU in torch >= 2.9; CUDA SM >= 8.9). Output in x's dtype."""
    x_scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    return torch._scaled_mm(xq, q.t(), scale_a=x_scale, scale_b=scale[None, :].float(), out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------- quantized weight
def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


class QuantWeight(nn.Module):
    """One weight [N, K] (a linear layer's) or [E, N, K] (packed experts) in one format, with `linear`
    (x @ W^T, for expert `e` of a packed weight) and `dequantize`."""

    def __init__(self, w: torch.Tensor, fmt: str, group: int = INT4_GROUP, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.fmt = check_format(fmt)
        self.shape = tuple(w.shape)
        self.compute_dtype = compute_dtype or w.dtype
        *_, n, k = self.shape
        cpu = w.device.type == "cpu"
        low_precision = self.compute_dtype in (torch.bfloat16, torch.float16)
        self.kernel = None
        if fmt == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
            if cpu and low_precision and k % 16 == 0 and _has_op("_weight_int8pack_mm"):
                self.kernel = "int8pack"
        elif fmt == "int4":
            # the largest group dividing the input size (64 -> 32 for an input of 96, say)
            self.group = group = math.gcd(k, group)
            if group % 2:
                raise ValueError(f"int4: input size {k} has no even group size dividing it")
            packed, scale, zero = quantize_int4(w, group)
            if (cpu and low_precision and n % 16 == 0 and group in (32, 64, 128, 256)
                    and _has_op("_convert_weight_to_int4pack_for_cpu")):
                # Repack (still two per byte) into the CPU kernel's tile layout; keep only that copy.
                self.kernel = "int4pack_cpu"
                q = unpack_int4(packed).to(torch.int32).reshape(-1, n, k)
                packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.contiguous(), 1) for m in q])
                packed = packed.reshape(*self.shape[:-1], -1)
                # [.., K/group, N, 2] in the activation dtype, as the kernel wants
                self.register_buffer("scales_and_zeros",
                                     torch.stack([scale, zero], -1).transpose(-3, -2).contiguous().to(self.compute_dtype))
            else:  # scale and zero in the 16-bit compute dtype where there is one (as the kernels keep them)
                keep = self.compute_dtype if low_precision else torch.float32
                self.register_buffer("scale", scale.to(keep))
                self.register_buffer("zero", zero.to(keep))
            self.register_buffer("packed", packed)
        elif fmt == "fp8":
            q, scale = quantize_fp8(w)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
            if _has_op("_scaled_mm") and n % 16 == 0 and k % 16 == 0 and self._scaled_mm_device(w.device):
                self.kernel = "scaled_mm"
        else:
            raise ValueError(f"QuantWeight: format {fmt!r}")

    @staticmethod
    def _scaled_mm_device(device: torch.device) -> bool:
        if device.type == "cpu":
            return True
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={list(self.shape)}, kernel={self.kernel}"

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _pick(self, name: str, expert: int | None) -> torch.Tensor:
        t = getattr(self, name)
        return t if expert is None else t[expert]

    def dequantize(self, dtype: torch.dtype | None = None, expert: int | None = None) -> torch.Tensor:
        """The float weight this stands for: [N, K] (one expert's for packed weights), or all of it."""
        dtype = dtype or self.compute_dtype
        if self.fmt == "int8":
            return dequantize_int8(self._pick("q", expert), self._pick("scale", expert), dtype)
        if self.fmt == "fp8":
            return dequantize_fp8(self._pick("q", expert), self._pick("scale", expert), dtype)
        if self.kernel == "int4pack_cpu":
            if expert is None and len(self.shape) == 3:
                return torch.stack([self.dequantize(dtype, e) for e in range(self.shape[0])])
            k = self.shape[-1]
            eye = torch.eye(k, dtype=self.compute_dtype, device=self.packed.device)
            wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self._pick("packed", expert), self.group,
                                                             self._pick("scales_and_zeros", expert))
            return wt.t().to(dtype)
        return dequantize_int4(self._pick("packed", expert), self._pick("scale", expert), self._pick("zero", expert), dtype)

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """x [.., K] -> x @ W^T [.., N] in x's dtype."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.shape[-2])
        if self.kernel == "int8pack" and x.dtype == self.compute_dtype:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self._pick("q", expert),
                                                     self._pick("scale", expert).to(x.dtype))
        elif self.kernel == "int4pack_cpu" and x.dtype == self.compute_dtype:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self._pick("packed", expert), self.group,
                                                             self._pick("scales_and_zeros", expert))
        elif self.kernel == "scaled_mm" and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
            out = fp8_linear(x2, self._pick("q", expert), self._pick("scale", expert))
        else:
            out = F.linear(x2, self.dequantize(x.dtype, expert))
        return out.reshape(*lead, -1)


class QuantLinear(nn.Module):
    """Drop-in for a bias-free `nn.Linear` with a quantized weight."""

    def __init__(self, linear: nn.Linear, fmt: str, group: int = INT4_GROUP):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear: layers with a bias are not supported")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = QuantWeight(linear.weight.detach(), fmt, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x)


class QuantExperts(nn.Module):
    """Drop-in for `layers.Experts` with quantized packed weights. Pairs are sorted by expert once (as the
    fast path does); each hit expert then runs its two quantized matmuls on its slice."""

    def __init__(self, experts: nn.Module, fmt: str, group: int = INT4_GROUP):
        super().__init__()
        self.num_experts = experts.num_experts
        self.gate_up = QuantWeight(experts.gate_up_proj.detach(), fmt, group)
        self.down = QuantWeight(experts.down_proj.detach(), fmt, group)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        from .model.fast import sort_by_expert

        order, token, counts = sort_by_expert(index, self.num_experts)
        xs = x[token]
        ys = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                gate, up = self.gate_up.linear(xs[start:start + n], expert).chunk(2, dim=-1)
                ys[start:start + n] = self.down.linear(F.gelu(gate, approximate="tanh") * up, expert)
                start += n
        ys = (ys * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


# ------------------------------------------------------------------------------------------------- model
def quantize_model(model: nn.Module, fmt: str | None, group: int = INT4_GROUP) -> nn.Module:
    """Replace, in place, every linear layer of the text stack (attention, dense MLP, self-conditioning)
    and every packed expert weight by its quantized form. The embedding / LM head, router and norms stay
    in the model's dtype. Returns the model."""
    fmt = check_format(fmt)
    if fmt is None:
        return model
    from .model.layers import Experts, Router

    def visit(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, Router):
                continue
            if isinstance(child, nn.Linear):
                setattr(module, name, QuantLinear(child, fmt, group))
            elif isinstance(child, Experts):
                setattr(module, name, QuantExperts(child, fmt, group))
            else:
                visit(child)

    for layer in model.layers:  # one layer at a time: the float copy of a layer is freed before the next
        visit(layer)
    visit(model.self_conditioning)
    model.quantization = fmt
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (weights as stored, quantized or not)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# google/diffusiongemma-26B-A4B-it's text stack, for size projections and the roofline benchmark. The
# reference page gives experts (128, top 8), vocab, canvas, softcap and RoPE; the sizes are the public
# Gemma 4 26B-A4B text config, which DiffusionGemma shares: an assumption until its config.json is read.
GEMMA4_26B_A4B_TEXT = dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                           num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                           moe_intermediate_size=704)


def projected_bytes(text, fmt: str | None, dtype_bytes: int = 2, group: int = INT4_GROUP,
                    scale_bytes: int = 2) -> dict[str, float]:
    """Weight bytes of a DiffusionGemma text stack (a `TextConfig`) stored as `quantize_model` stores it
    (embedding, router and norms in the float dtype; int4 scale/zero at `scale_bytes` each, as a bf16
    kernel holds them). Returns parameter counts and bytes per part."""
    h, v = text.hidden_size, text.vocab_size
    attn = 0
    for spec in text.layers:
        q_out = text.num_attention_heads * spec.head_dim
        kv = spec.num_kv_heads * spec.head_dim
        attn += h * q_out * 2 + h * kv * (2 if spec.is_sliding else 1)  # q, o, k (+ v on sliding layers)
    layers = text.num_hidden_layers
    dense = 3 * h * text.intermediate_size * layers + 3 * h * text.intermediate_size  # + self-conditioning MLP
    experts = 3 * h * text.moe_intermediate_size * text.num_experts * layers
    router = (h * text.num_experts + h + text.num_experts) * layers
    embedding = v * h
    quantized = attn + dense + experts
    per_weight = {None: dtype_bytes, "int8": 1, "fp8": 1, "int4": 0.5 + 2 * scale_bytes / group}[fmt]
    # int8 / fp8 scales: one float32 per output channel, negligible (< 0.1%); counted as 0
    total = quantized * per_weight + (embedding + router) * dtype_bytes
    return {"params": quantized + embedding + router, "quantized_params": quantized, "embedding_params": embedding,
            "bytes": total, "gib": total / 2**30, "gb": total / 1e9, "bits_per_quantized_weight": per_weight * 8}


def drift(reference_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Max absolute logit error and argmax agreement between two [.., V] logit tensors."""
    return {"max_abs_logit_error": float((reference_logits.float() - logits.float()).abs().max()),
            "argmax_agreement": float((reference_logits.argmax(-1) == logits.argmax(-1)).float().mean())}


__all__ = ["FORMATS", "INT4_GROUP", "GEMMA4_26B_A4B_TEXT", "QuantWeight", "QuantLinear", "QuantExperts", "quantize_model", "model_bytes",
           "projected_bytes", "drift", "check_format", "quantize_int8", "dequantize_int8", "quantize_int4",
           "dequantize_int4", "pack_int4", "unpack_int4", "quantize_fp8", "dequantize_fp8", "fp8_linear"]
