"""Building blocks of the DiffusionGemma text stack: norms, RoPE, dense MLP, router and packed experts.

Plain PyTorch; every function here is the reference path that faster versions are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig, TextConfig
from .moe import moe_forward


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in float32, scaled by `weight` (not 1 + weight), or unscaled."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


@torch.no_grad()
def init_parameters(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Fresh weights in place: normal(0, std) matrices, ones for vectors (norm scales)."""
    for p in module.parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=generator)
        else:
            p.fill_(1.0)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for one layer type."""
    if rope.rope_type == "proportional":
        # Rotate the first `partial_rotary_factor` of the angles with the full-head-dim denominator; the
        # remaining angles get frequency 0, i.e. they pass through unrotated.
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (rope.theta**exponents)
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])
        return inv / rope.factor
    dim = int(head_dim * rope.partial_rotary_factor)
    return 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] -> cos, sin: [B, T, head_dim] in `dtype`."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, d]; cos/sin: [B, T, d]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses `top_k` of `num_experts` per token from the raw residual stream (not the pre-FFW norm)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root_size = cfg.hidden_size**-0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (weights [N, k] float32, expert ids [N, k])."""
        scores = self.proj(self.norm(x) * self.scale * self.root_size)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size))
        self.impl = "loop"  # or a fast method from `moe.MOE_METHODS` ("grouped_mm", "sorted", ...)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x: [N, H]; weights, index: [N, k]. Loops over the experts that were hit (the plain path)."""
        if self.impl != "loop":
            return moe_forward(self.gate_up_proj, self.down_proj, x, weights, index, self.impl)
        out = torch.zeros_like(x)
        for expert in torch.unique(index).tolist():
            token, slot = torch.where(index == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(gelu_tanh(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out
