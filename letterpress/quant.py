"""Weight-only quantization: int8, group-wise int4 and fp8, for every linear layer and the packed experts.

    load_model(path, quantization="int4")                quantize each tensor while loading; `LLM(...,
                                                         quantization=...)`, `--quantization` on every command
    quantize_model(model, "int8" | "int4" | "fp8")       in place, on a model already in memory
    letterpress quantize MODEL OUT --format int4         write a compressed-tensors checkpoint (quant_save.py)

Formats (W is a weight [.., N out, K in]; packed experts are [E, N, K] and quantize per expert):

- int8: per-output-channel symmetric, W ~ q * scale[n], q in [-127, 127]. 1 byte per weight.
- int4: group-wise asymmetric over `group` (64; the largest divisor of the input size up to 64) inputs, W ~ (q - 8) * scale + zero with
  q in [0, 15] (the convention of torch's int4 kernels), packed two per byte: byte = q[2i] | q[2i+1] << 4.
  4 bits + scale and zero per group, 16-bit in a bf16/fp16 model (4.5 bits per weight), 32-bit in float32.
- fp8: float8 e4m3 with a per-output-channel scale (|W| max -> 448). 1 byte per weight.

Compute. A quantized weight is used where it is needed: by a torch kernel that reads it directly when one
exists for the device, dtype and shape, otherwise by dequantizing into the activation dtype and calling
`F.linear` (always correct, never faster than float):

| format | CPU bf16/fp16 activations | CPU fp32 activations | CUDA (run on an H200, gpu_check.py) |
|---|---|---|---|
| int8 | `_weight_int8pack_mm` (K % 16 == 0) | dequantize + linear | dequantize + linear |
| int4 | `_weight_int4pack_mm_for_cpu` (N % 16, K % group) | dequantize + linear | dequantize + linear |
| fp8 | `_scaled_mm` with per-token fp8 activations (W8A8) | same | same kernel on SM >= 8.9 |

Packed experts on the fast path on CUDA run grouped (`QuantExperts`, "grouped"): fp8 as one
`_scaled_grouped_mm` per projection (SM 9.x), the other formats by dequantizing the layer's experts and one
`_grouped_mm`. There is no int4 GPU kernel here, so int4 on a GPU saves memory but runs slower than bf16.

Not quantized: the embedding (tied with the LM head and read three ways: lookup, LM head, the
self-conditioning matmul over the vocabulary; ~3% of the 26B's weights), the router (its top-k choices
flip easily) and the norms.

Loading (letterpress.model.load_model): the model is built on the meta device, its linear layers and
experts are swapped for empty QuantWeights, and each tensor is quantized as it is read (packed experts one
expert slice at a time), so the float model never exists: loading peaks at about the quantized model plus
the largest float tensor. Checkpoints in the compressed-tensors layout (see "compressed-tensors" below;
`letterpress quantize` writes them) load as stored, without float weights.
"""

from __future__ import annotations


import logging
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NotSupportedError
from .model.layers import Experts, Router
from .model.moe import grouped_experts, moe_forward, sort_by_expert

logger = logging.getLogger(__name__)

FORMATS = ("int8", "int4", "fp8")  # what we quantize float weights to
LOADABLE_FORMATS = FORMATS + ("nvfp4",)  # what a QuantWeight holds (nvfp4 only from compressed-tensors)
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
    """scale [.., N] (per channel) or [.., N, K/group] (group-wise)."""
    if scale.ndim == q.ndim:
        *lead, n, k = q.shape
        w = q.float().reshape(*lead, n, scale.shape[-1], -1) * scale[..., None].float()
        return w.reshape(*lead, n, k).to(dtype)
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


E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # float4 e2m1 magnitudes by the low 3 bits


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4 as compressed-tensors stores it: e2m1 codes [.., N, K/2] (two per byte, low nibble first; bit 3
    is the sign), one float8 scale per 16 inputs [.., N, K/16], a float32 global scale: W = v * scale / global."""
    codes = unpack_int4(packed)  # [.., N, K]
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    values = table[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())
    *lead, n, k = values.shape
    per_group = scale.float() / global_scale.float().reshape(-1)[0]
    w = values.reshape(*lead, n, scale.shape[-1], -1) * per_group[..., None]
    return w.reshape(*lead, n, k).to(dtype)


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


def quantize_parts(w: torch.Tensor, fmt: str, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """One float weight [N, K] -> the tensors `QuantWeight.load_parts` takes (see there)."""
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return {"q": q, "scale": scale}
    if fmt == "fp8":
        q, scale = quantize_fp8(w)
        return {"q": q, "scale": scale}
    if fmt == "int4":
        packed, scale, zero = quantize_int4(w, int4_group(w.shape[-1], group))
        return {"packed": packed, "scale": scale, "zero": zero}
    raise ValueError(f"quantize_parts: format {fmt!r}")


def int4_group(k: int, group: int = INT4_GROUP) -> int:
    """The largest group dividing the input size (64 -> 32 for an input of 96, say)."""
    g = math.gcd(k, group)
    if g % 2:
        raise ValueError(f"int4: input size {k} has no even group size dividing it")
    return g


class QuantWeight(nn.Module):
    """One weight [N, K] (a linear layer's) or [E, N, K] (packed experts) in one format, with `linear`
    (x @ W^T, for expert `e` of a packed weight) and `dequantize`.

    Built from a float weight (`QuantWeight(w, fmt)`), or empty (`QuantWeight(None, fmt, shape=...,
    compute_dtype=...)`, no buffers) and filled later by `load_float` or `load_parts`: the loader fills it
    tensor by tensor, so the float weight never exists in full (3-D weights are quantized expert by expert).

    Parts (what `load_parts` takes; leading [E] for packed experts):
    - int8: q int8 [N, K], scale [N] (per channel) or [N, K/group] (group-wise, as compressed-tensors
      W8A16 stores it); W = q * scale.
    - int4: packed uint8 [N, K/2] (u in [0, 15], two per byte, low nibble first), scale and zero
      [N, K/group]; W = (u - 8) * scale + zero.
    - fp8: q float8_e4m3fn [N, K], scale [N]; W = q * scale.
    - nvfp4 (load only, from compressed-tensors): packed uint8 [N, K/2] (e2m1 codes, low nibble first),
      scale float8_e4m3fn [N, K/16], global_scale [1]; W = e2m1(code) * scale / global_scale."""

    def __init__(self, w: torch.Tensor | None, fmt: str | None, group: int = INT4_GROUP,
                 compute_dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None):
        """`fmt` may be None for an empty weight that `load_parts` will fill (it names the format then)."""
        super().__init__()
        if fmt not in LOADABLE_FORMATS and not (fmt is None and w is None):
            raise ValueError(f"QuantWeight: format {fmt!r}")
        self.fmt = fmt
        self.shape = tuple(w.shape if w is not None else shape)
        self.compute_dtype = compute_dtype or (w.dtype if w is not None else torch.float32)
        self.group = group
        self.kernel = None
        if w is not None:
            self.load_float(w)

    # --------------------------------------------------------------------------------------------- filling
    @torch.no_grad()
    def load_float(self, w: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Quantize a float weight, or the per-expert slices [N, K] of a packed one (a sequence that may
        read each slice only when asked, so one expert's float weight is in memory at a time)."""
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            parts = quantize_parts(w, self.fmt, self.group)
        else:
            # Each expert's parts go straight into [E, ...] tensors allocated once: nothing long-lived is
            # allocated between one slice's float temporaries and the next, so the heap reuses them (keeping
            # small per-expert results until a final stack left holes that glibc grew around, by up to two
            # float tensors depending on the address-space layout) and there is no stacked copy.
            parts = {}
            for e in range(len(w)):
                for name, part in quantize_parts(w[e], self.fmt, self.group).items():
                    if e == 0:
                        parts[name] = part.new_empty((len(w), *part.shape))
                    parts[name][e].copy_(part)
        self.load_parts(parts)

    @torch.no_grad()
    def load_parts(self, parts: dict[str, torch.Tensor], fmt: str | None = None) -> None:
        """Take already quantized tensors (see the class docstring) in `fmt` (default: the weight's format)
        and pick the kernel for their device."""
        if fmt is not None:
            if fmt not in LOADABLE_FORMATS:
                raise ValueError(f"QuantWeight: format {fmt!r}")
            self.fmt = fmt
        *_, n, k = self.shape
        first = next(iter(parts.values()))
        cpu = first.device.type == "cpu"
        low_precision = self.compute_dtype in (torch.bfloat16, torch.float16)
        for name in list(self._buffers):
            del self._buffers[name]
        self.kernel = None
        if self.fmt == "int8":
            scale = parts["scale"].float()
            self.register_buffer("q", parts["q"].to(torch.int8))
            self.register_buffer("scale", scale)
            if scale.shape[-1] != n:  # group-wise scales [.., N, G]: dequantize + linear only
                return
            if cpu and low_precision and k % 16 == 0 and _has_op("_weight_int8pack_mm"):
                self.kernel = "int8pack"
        elif self.fmt == "int4":
            packed, scale, zero = parts["packed"], parts["scale"], parts["zero"]
            self.group = group = k // scale.shape[-1]
            if (cpu and low_precision and n % 16 == 0 and group in (32, 64, 128, 256)
                    and _has_op("_convert_weight_to_int4pack_for_cpu")):
                # Repack (still two per byte) into the CPU kernel's tile layout, one [N, K] matrix at a time
                # (its int32 unpacking is 8x the packed size); keep only that copy.
                self.kernel = "int4pack_cpu"
                flat = packed.reshape(-1, n, k // 2)
                repacked = None
                for i in range(flat.shape[0]):
                    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                        unpack_int4(flat[i]).to(torch.int32).contiguous(), 1)
                    if repacked is None:
                        repacked = tiles.new_empty(flat.shape[0], *tiles.shape)
                    repacked[i] = tiles
                packed = repacked.reshape(*self.shape[:-2], *repacked.shape[1:])
                # [.., K/group, N, 2] in the activation dtype, as the kernel wants
                self.register_buffer("scales_and_zeros",
                                     torch.stack([scale.float(), zero.float()], -1).transpose(-3, -2)
                                     .contiguous().to(self.compute_dtype))
            else:  # scale and zero in the 16-bit compute dtype where there is one (as the kernels keep them)
                keep = self.compute_dtype if low_precision else torch.float32
                self.register_buffer("scale", scale.to(keep))
                self.register_buffer("zero", zero.to(keep))
            self.register_buffer("packed", packed.to(torch.uint8) if packed.dtype != torch.int32 else packed)
        elif self.fmt == "fp8":
            self.register_buffer("q", parts["q"].to(torch.float8_e4m3fn))
            self.register_buffer("scale", parts["scale"].float())
            if _has_op("_scaled_mm") and n % 16 == 0 and k % 16 == 0 and self._scaled_mm_device(first.device):
                self.kernel = "scaled_mm"
        elif self.fmt == "nvfp4":
            self.register_buffer("packed", parts["packed"].to(torch.uint8))
            self.register_buffer("scale", parts["scale"])
            self.register_buffer("global_scale", parts["global_scale"].float().reshape(-1)[:1])

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

    def _pick(self, name: str, expert: int | slice | None) -> torch.Tensor:
        t = getattr(self, name)
        return t if expert is None else t[expert]

    def dequantize(self, dtype: torch.dtype | None = None, expert: int | slice | None = None) -> torch.Tensor:
        """The float weight this stands for: [N, K] (one expert's for packed weights; [e, N, K] for a slice of
        experts), or all of it."""
        dtype = dtype or self.compute_dtype
        if self.fmt == "int8":
            return dequantize_int8(self._pick("q", expert), self._pick("scale", expert), dtype)
        if self.fmt == "fp8":
            return dequantize_fp8(self._pick("q", expert), self._pick("scale", expert), dtype)
        if self.fmt == "nvfp4":
            return dequantize_nvfp4(self._pick("packed", expert), self._pick("scale", expert), self.global_scale, dtype)
        if self.kernel == "int4pack_cpu":
            if expert is None and len(self.shape) == 3:
                return torch.stack([self.dequantize(dtype, e) for e in range(self.shape[0])])
            k = self.shape[-1]
            eye = torch.eye(k, dtype=self.compute_dtype, device=self.packed.device)
            wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self._pick("packed", expert), self.group,
                                                             self._pick("scales_and_zeros", expert))
            return wt.t().to(dtype)
        return dequantize_int4(self._pick("packed", expert), self._pick("scale", expert), self._pick("zero", expert), dtype)

    def dequantize_experts(self, dtype: torch.dtype, chunk_bytes: int = 2**29) -> torch.Tensor:
        """Every expert's float weight [E, N, K] in `dtype`, dequantized a few experts at a time so that each
        float32 temporary stays under `chunk_bytes` (two live at once, beside the output; a whole layer's would be
        several GiB at the released shapes).
        int4 with 16-bit scales (a GPU's) computes in that dtype, as its kernels do: one fused multiply-add,
        a third of the float32 version's memory traffic, which bounds this path (benchmarks/gpu_check.py)."""
        if self.kernel == "int4pack_cpu":
            return self.dequantize(dtype)
        experts, n, k = self.shape
        out = torch.empty(self.shape, dtype=dtype, device=next(self.buffers()).device)
        low_precision_int4 = self.fmt == "int4" and self.scale.dtype == dtype in (torch.bfloat16, torch.float16)
        step = max(1, chunk_bytes // (n * k * 4))
        for start in range(0, experts, step):
            part = slice(start, start + step)
            if low_precision_int4:
                q, scale, zero = unpack_int4(self.packed[part]), self.scale[part], self.zero[part]
                # W = (q - 8) * scale + zero = q * scale + (zero - 8 * scale), per group of inputs
                grouped = q.view(*q.shape[:-1], scale.shape[-1], -1).to(dtype)
                out[part] = torch.addcmul((zero - 8 * scale)[..., None], grouped, scale[..., None]).flatten(-2)
            else:
                out[part] = self.dequantize(dtype, part)
        return out

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

    def __init__(self, linear: nn.Linear, fmt: str, group: int = INT4_GROUP, empty: bool = False):
        """`empty`: keep no weight (the linear may live on the meta device); the loader fills `qweight`."""
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear: layers with a bias are not supported")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.qweight = (QuantWeight(None, fmt, group, compute_dtype=w.dtype, shape=tuple(w.shape)) if empty
                        else QuantWeight(w, fmt, group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x)


class QuantExperts(nn.Module):
    """Drop-in for `layers.Experts` with quantized packed weights. Pairs are sorted by expert once (as the
    fast path does); then, by `impl`:
    - "sorted" (the default, and the plain path): each hit expert runs its two quantized matmuls on its slice,
      with the CPU's int8 / int4 kernels where they apply. On a GPU that is 2 x (up to 128) small launches a
      layer, which bound the step (1.1 s at the released shapes on an H200, benchmarks/gpu_check.py);
    - "grouped" (`fast.apply_fast_path` picks it on CUDA): one grouped matmul per projection. fp8 runs
      `torch._scaled_grouped_mm` on fp8 activations where the GPU has it (SM 9.x, W8A8 as in `fp8_linear`);
      every other format dequantizes the layer's experts (a few at a time, see `dequantize_experts`) into a
      transient float weight and runs `torch._grouped_mm`, trading that transient for the launches."""

    def __init__(self, experts: nn.Module, fmt: str, group: int = INT4_GROUP, empty: bool = False):
        """`empty`: keep no weights (the experts may live on the meta device); the loader fills them."""
        super().__init__()
        self.num_experts = experts.num_experts
        self.impl = "sorted"
        self.scaled_grouped_mm = None  # None: not decided yet; False: not usable here (or it failed once)

        def make(w: torch.Tensor) -> QuantWeight:
            w = w.detach()
            return (QuantWeight(None, fmt, group, compute_dtype=w.dtype, shape=tuple(w.shape)) if empty
                    else QuantWeight(w, fmt, group))

        self.gate_up = make(experts.gate_up_proj)
        self.down = make(experts.down_proj)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.impl == "grouped":
            return self.forward_grouped(x, weights, index)
        return self.forward_sorted(x, weights, index)

    # Left out of torch.compile's graphs: the loop reads the per-expert counts on the host, and each pattern of
    # empty experts made compile specialize again, until its recompile limit (a warning storm, then eager).
    @torch.compiler.disable
    def forward_sorted(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_grouped_mm(x):
            def run() -> torch.Tensor:
                return grouped_experts(x, weights, index, self.num_experts,
                                       lambda xs, offs: fp8_grouped_linear(xs, self.gate_up.q, self.gate_up.scale, offs),
                                       lambda xs, offs: fp8_grouped_linear(xs, self.down.q, self.down.scale, offs))

            if torch.compiler.is_compiling():  # decided up front (`use_scaled_grouped_mm`): no try in a graph
                return run()
            try:
                return run()
            except (RuntimeError, NotImplementedError) as error:  # a case the checks below did not foresee
                self.scaled_grouped_mm = False
                logger.warning("fp8 experts: torch._scaled_grouped_mm failed (%s); dequantizing instead",
                               str(error).splitlines()[0])
        gate_up, down = self.gate_up.dequantize_experts(x.dtype), self.down.dequantize_experts(x.dtype)
        return moe_forward(gate_up, down, x, weights, index, "grouped_mm")

    def use_scaled_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether the fp8 kernel takes these experts: both projections fp8, every size a multiple of 16 (a
        tensor-parallel shard of 704 / 8 = 88 is not), bf16 activations on an SM 9.x GPU. Decided once."""
        if self.scaled_grouped_mm is None:
            g, d = self.gate_up, self.down
            self.scaled_grouped_mm = bool(
                hasattr(torch, "_scaled_grouped_mm") and g.fmt == d.fmt == "fp8" and x.dtype == torch.bfloat16
                and all(size % 16 == 0 for size in (*g.shape[1:], *d.shape[1:]))
                and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] == 9)
        return self.scaled_grouped_mm


def fp8_grouped_linear(xs: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs [M, K] sorted by expert, offsets [E] int32 (each expert's end row) -> [M, N]: row block e times
    (q[e] * scale[e])^T, with xs quantized per row to e4m3 as in `fp8_linear`. q [E, N, K] e4m3, scale [E, N]."""
    x_scale = (xs.abs().amax(-1).float() / FP8_MAX).clamp(min=_TINY)  # [M]
    xq = (xs.float() / x_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_grouped_mm(xq, q.transpose(-2, -1), x_scale, scale.float(), offs=offsets,
                                    out_dtype=xs.dtype)


# ------------------------------------------------------------------------------------- compressed-tensors
# The on-disk layout of compressed-tensors (the library vLLM and llm-compressor use), for the formats we
# read and write. Per quantized module `prefix` (a linear layer's `prefix.weight` in a float checkpoint):
#   pack-quantized (W4A16, W8A16): prefix.weight_packed int32 [N, ceil(K*bits/32)] (consecutive values of
#       a row, offset to unsigned, packed little-end first: for 4 bits, byte i holds values 2i and 2i+1 in
#       its low and high nibble, exactly our `pack_int4`), prefix.weight_scale [N, K/group] (or [N, 1] per
#       channel), prefix.weight_shape int64 [N, K], and for asymmetric schemes prefix.weight_zero_point
#       int32 [ceil(N*bits/32), K/group] (packed the same way along the output dimension).
#       W = (q - zero_point) * scale with q signed (in [-8, 7] for 4 bits).
#   int-quantized / float-quantized (INT8, FP8): prefix.weight int8 / float8_e4m3fn [N, K],
#       prefix.weight_scale [N, 1] (channel) or [1] (tensor); W = q * scale.
#   nvfp4-pack-quantized: prefix.weight_packed uint8 [N, K/2], prefix.weight_scale float8 [N, K/16],
#       prefix.weight_global_scale [1] (see `dequantize_nvfp4`).
# Packed experts (3-D parameters, not nn.Linear) are not compressed by compressed-tensors 0.20, which only
# handles nn.Linear / nn.Embedding; `letterpress quantize` stores them with the same names and packing on
# the 3-D weight (prefix = ...experts.gate_up_proj, shapes with a leading [E]).
CT_METHOD = "compressed-tensors"
CT_FORMATS = {"pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized"}
CT_INT4_GROUP = 128  # the group size of compressed-tensors' W4A16 preset (and of the community's builds)


def ct_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers [.., K] (|q| < 2^(bits-1)) -> int32 words [.., ceil(K*bits/32)], compressed-tensors'
    packing along the last dimension, for 4 or 8 bits."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        if u.shape[-1] % 2:
            u = F.pad(u, (0, 1))
        u = pack_int4(u)
    elif bits != 8:
        raise NotSupportedError(f"compressed-tensors packing of {bits}-bit values is not supported (4 or 8)")
    pad = -u.shape[-1] % 4
    if pad:
        u = F.pad(u, (0, pad))
    return u.contiguous().view(torch.int32)


def ct_unpack_bytes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words [.., W] -> unsigned values [.., K] as uint8 (offset by 2^(bits-1) from the signed q)."""
    u = packed.contiguous().view(torch.uint8)
    if bits == 4:
        return unpack_int4(u)[..., :k]
    if bits == 8:
        return u[..., :k]
    raise NotSupportedError(f"compressed-tensors {bits}-bit packed weights are not supported (4 or 8 bits)")


def ct_packed_bits(packed: torch.Tensor, k: int) -> int:
    """The bit width of a pack-quantized weight, from its packed width and input size."""
    for bits in (4, 8, 2, 3, 5, 6, 7):
        if packed.shape[-1] == math.ceil(k * bits / 32):
            return bits
    raise NotSupportedError(f"pack-quantized weight of width {packed.shape[-1]} for {k} inputs: unknown bit width")


def ct_to_parts(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[str, dict[str, torch.Tensor]]:
    """One module's stored compressed-tensors tensors (local names: weight, weight_packed, weight_scale,
    weight_zero_point, weight_global_scale, ...) -> (format, parts for `QuantWeight.load_parts`)."""
    *lead, n, k = shape
    scale = tensors.get("weight_scale")
    if scale is None:
        raise NotSupportedError("compressed-tensors weight without weight_scale")
    if "weight_global_scale" in tensors:  # nvfp4
        return "nvfp4", {"packed": tensors["weight_packed"], "scale": scale,
                         "global_scale": tensors["weight_global_scale"]}
    if "weight_packed" in tensors:
        packed = tensors["weight_packed"]
        bits = ct_packed_bits(packed, k)
        scale = scale.reshape(*lead, n, -1)
        if k % scale.shape[-1]:
            raise NotSupportedError(f"weight_scale of {scale.shape[-1]} groups does not divide {k} inputs")
        zero_point = tensors.get("weight_zero_point")
        if zero_point is not None:  # packed along the output dimension: [.., ceil(N*bits/32), G]
            zp = ct_unpack_bytes(zero_point.transpose(-1, -2), bits, n).transpose(-1, -2).float() - (1 << (bits - 1))
        else:
            zp = torch.zeros_like(scale, dtype=torch.float32)
        if bits == 4:  # our int4: W = (u - 8) * scale + zero, with u = q + 8 the stored nibble
            packed_u8 = packed.contiguous().view(torch.uint8)[..., :k // 2] if k % 2 == 0 else None
            if packed_u8 is None:
                raise NotSupportedError(f"int4 weight with an odd input size {k}")
            return "int4", {"packed": packed_u8, "scale": scale, "zero": -zp * scale.float()}
        if bits == 8 and zero_point is None:
            q = (ct_unpack_bytes(packed, 8, k).to(torch.int16) - 128).to(torch.int8)
            return "int8", {"q": q, "scale": scale.squeeze(-1) if scale.shape[-1] == 1 else scale}
        raise NotSupportedError(f"compressed-tensors pack-quantized {bits}-bit weights"
                                f"{' with zero points' if zero_point is not None else ''} are not supported")
    weight = tensors["weight"]
    if weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise NotSupportedError(f"compressed-tensors weight of dtype {weight.dtype} is not supported")
    if scale.numel() == 1:  # tensor strategy: one scale for the whole weight
        scale = scale.reshape(1).expand(*lead, n)
    elif scale.shape[-1] == 1 or scale.ndim == len(shape) - 1:
        scale = scale.reshape(*lead, n)
    else:
        raise NotSupportedError(f"compressed-tensors {weight.dtype} weight with a weight_scale of shape "
                                f"{list(scale.shape)} (block or group scales) is not supported")
    if tensors.get("weight_zero_point") is not None and bool(tensors["weight_zero_point"].any()):
        raise NotSupportedError("asymmetric int8 / fp8 compressed-tensors weights are not supported")
    return ("int8" if weight.dtype == torch.int8 else "fp8"), {"q": weight, "scale": scale.contiguous()}


def ct_quantize(w: torch.Tensor | Sequence[torch.Tensor], fmt: str, scale_dtype: torch.dtype,
                group: int = CT_INT4_GROUP) -> dict[str, torch.Tensor]:
    """A float weight [N, K], or the per-expert slices of a packed [E, N, K] one (a sequence that may read
    each slice when asked), -> compressed-tensors tensors (local names) in our scheme for `fmt`: int8 and
    fp8 as `quantize_int8` / `quantize_fp8` (per channel, float32 scales; the same numbers as quantizing
    while loading), int4 as compressed-tensors' W4A16 preset (symmetric, groups of `group` inputs (see
    `ct_int4_group`), scale = max|W| / 7.5 rounded to `scale_dtype`, q = round(W / scale) in [-8, 7])."""
    if not isinstance(w, torch.Tensor) or w.ndim == 3:
        per_expert = [ct_quantize(w[e], fmt, scale_dtype, group) for e in range(len(w))]
        out = {name: torch.stack([p[name] for p in per_expert]) for name in per_expert[0] if name != "weight_shape"}
        if "weight_shape" in per_expert[0]:
            out["weight_shape"] = torch.tensor([len(w), *per_expert[0]["weight_shape"].tolist()])
        return out
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return {"weight": q, "weight_scale": scale[:, None]}
    if fmt == "fp8":
        q, scale = quantize_fp8(w)
        return {"weight": q, "weight_scale": scale[:, None]}
    if fmt == "int4":
        n, k = w.shape
        if k % group:
            raise ValueError(f"int4: the input size {k} is not a multiple of the group size {group}")
        groups = w.float().reshape(n, k // group, group)
        # rounded to the stored dtype first, then used as stored (as compressed-tensors does)
        scale = (groups.abs().amax(-1) / 7.5).to(scale_dtype).clamp(min=torch.finfo(scale_dtype).tiny)
        q = torch.round(groups / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
        return {"weight_packed": ct_pack(q, 4), "weight_scale": scale, "weight_shape": torch.tensor([n, k])}
    raise ValueError(f"ct_quantize: format {fmt!r}")


def ct_int4_group(input_sizes: Sequence[int]) -> int:
    """One group size for every int4 weight of a checkpoint: 128 (compressed-tensors' W4A16 preset) or the
    largest divisor of 128 that divides every input size (64 for the 26B-A4B, whose expert down projection
    has 704 inputs). One size, because transformers 5.23 applies one scheme to all dense layers."""
    group = CT_INT4_GROUP
    for k in input_sizes:
        group = math.gcd(group, k)
    if group % 2:
        raise ValueError(f"int4: input sizes {sorted(set(input_sizes))} have no common even group size")
    return group


def quantized_tensor_names(model: nn.Module) -> list[str]:
    """The tensors `quantize_model` (and quantizing while loading) quantizes: every linear weight of the
    layers and the self-conditioning block except the routers', and the packed expert weights."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and not path.endswith("router.proj") and (
                path.startswith("layers.") or path.startswith("self_conditioning.")):
            names.append(f"{path}.weight")
        elif isinstance(module, Experts):
            names += [f"{path}.gate_up_proj", f"{path}.down_proj"]
    return names


def ct_scheme(fmt: str, group: int | None) -> dict:
    """The compressed-tensors config group (without targets) for one of our formats."""
    if fmt == "int4":
        weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group, "symmetric": True,
                   "dynamic": False}
        return {"format": "pack-quantized", "weights": weights, "input_activations": None, "output_activations": None}
    if fmt == "int8":  # weight-only int8 per channel (W8A16)
        weights = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
        return {"format": "int-quantized", "weights": weights, "input_activations": None, "output_activations": None}
    if fmt == "fp8":  # FP8_DYNAMIC: per-channel weights, per-token dynamic activations (what our kernel does)
        weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
        return {"format": "float-quantized", "weights": weights, "input_activations": acts, "output_activations": None}
    raise ValueError(f"ct_scheme: format {fmt!r}")


def ct_quantization_config(fmt: str, group: int | None, ignore: list[str], version: str = "0.20.1") -> dict:
    """config.json's `quantization_config` for a checkpoint written by `letterpress quantize`: one config
    group targeting every Linear (and, for us, the packed experts), the routers and the LM head in `ignore`."""
    groups = {"group_0": {**ct_scheme(fmt, group), "targets": ["Linear"]}}
    return {"quant_method": CT_METHOD, "format": ct_scheme(fmt, None)["format"],
            "config_groups": groups, "ignore": ignore, "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": version}


def ct_formats(qc: dict) -> set[str]:
    """Our format names ("int8", "int4", "fp8") of a compressed-tensors config's weight groups."""
    formats = set()
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        kind, bits = weights.get("type"), weights.get("num_bits")
        formats.add("fp8" if kind == "float" else f"int{bits}")
    return formats


def ct_check_config(qc: dict, where: str) -> None:
    """Refuse what we cannot load, naming it."""
    method = qc.get("quant_method")
    if method != CT_METHOD:
        raise NotSupportedError(f"{where}: quantization_config.quant_method {method!r} is not supported; "
                                f"letterpress loads {CT_METHOD} checkpoints (and quantizes float ones itself)")
    for name, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if fmt not in CT_FORMATS:
            raise NotSupportedError(f"{where}: compressed-tensors format {fmt!r} (config group {name}) is not "
                                    f"supported; letterpress loads {', '.join(sorted(CT_FORMATS))}")
        weights = group.get("weights") or {}
        if weights.get("strategy") == "block":
            raise NotSupportedError(f"{where}: block-wise weight scales (config group {name}) are not supported")
        if weights.get("actorder") not in (None, "static", "weight") and weights.get("actorder") is not False:
            raise NotSupportedError(f"{where}: activation-ordered (g_idx) weights (config group {name}) "
                                    "are not supported")


# ------------------------------------------------------------------------------------------------- model
def quantizable(module: nn.Module, path: str = "", kinds: tuple[type, ...] | None = None
                ) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """What quantizing replaces below `module`: (parent, attribute name, child, dotted path from `path`) for
    every linear layer and packed expert pair (or, with `kinds`, every module of those types: the quantized
    ones, for `dequantize_model`), depth first; routers are skipped whole. Each level's children are listed
    before the first is yielded, so the caller may replace the child it is given."""
    kinds = kinds or (nn.Linear, Experts)
    for name, child in list(module.named_children()):
        full = f"{path}.{name}" if path else name
        if isinstance(child, Router):
            continue
        if isinstance(child, kinds):
            yield module, name, child, full
        else:
            yield from quantizable(child, full, kinds)


def quantize_module(module: nn.Module, fmt: str, group: int = INT4_GROUP) -> None:
    """Replace, in place, every linear layer and packed expert pair below `module` (a layer, say) by its
    quantized form; `fmt` already checked (`check_format`)."""
    for parent, name, child, _ in quantizable(module):
        setattr(parent, name, QuantLinear(child, fmt, group) if isinstance(child, nn.Linear) else
                QuantExperts(child, fmt, group))


def quantize_model(model: nn.Module, fmt: str | None, group: int = INT4_GROUP) -> nn.Module:
    """Replace, in place, every linear layer of the text stack (attention, dense MLP, self-conditioning)
    and every packed expert weight by its quantized form. The embedding / LM head, router and norms stay
    in the model's dtype. Returns the model."""
    fmt = check_format(fmt)
    if fmt is None:
        return model
    for layer in model.layers:  # one layer at a time: the float copy of a layer is freed before the next
        quantize_module(layer, fmt, group)
    quantize_module(model.self_conditioning, fmt, group)
    model.quantization = fmt
    model.weights_version = getattr(model, "weights_version", 0) + 1  # see DiffusionGemma.weights_version
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The inverse of `quantize_model`, in place: every quantized linear layer and expert pair back to a float
    one holding its dequantized weight (what the quantized model computes with), e.g. to train further from a
    checkpoint that ships quantized. The rest of the model is cast to `dtype`. Returns the model."""
    for parent, name, child, _ in quantizable(model, kinds=(QuantLinear, QuantExperts)):
        if isinstance(child, QuantLinear):
            linear = nn.Linear(child.in_features, child.out_features, bias=False, dtype=dtype)
            linear.weight.data = child.qweight.dequantize(dtype)
            setattr(parent, name, linear)
        else:
            with torch.device("meta"):
                experts = Experts(model.config.text)
            experts.gate_up_proj = nn.Parameter(child.gate_up.dequantize(dtype))
            experts.down_proj = nn.Parameter(child.down.dequantize(dtype))
            setattr(parent, name, experts)
    model.quantization = None
    return model.to(dtype)


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


__all__ = ["LOADABLE_FORMATS", "CT_METHOD", "ct_pack", "ct_unpack_bytes", "ct_to_parts", "ct_quantize",
           "ct_quantization_config", "ct_check_config", "ct_int4_group", "quantized_tensor_names", "dequantize_nvfp4", "quantize_parts", "FORMATS", "INT4_GROUP", "GEMMA4_26B_A4B_TEXT", "QuantWeight", "QuantLinear", "QuantExperts", "quantizable", "quantize_module",
           "quantize_model", "model_bytes",
           "projected_bytes", "drift", "check_format", "quantize_int8", "dequantize_int8", "quantize_int4",
           "dequantize_int4", "pack_int4", "unpack_int4", "quantize_fp8", "dequantize_fp8", "fp8_linear"]
