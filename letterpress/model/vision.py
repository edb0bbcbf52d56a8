"""The Gemma 4 vision tower and `embed_vision` of DiffusionGemma, in plain PyTorch.

Patches in, soft tokens out: pixel patches [B, P, 3·p²] in [0, 1] and their (x, y) grid positions
[B, P, 2] (padding rows at (-1, -1)) become one embedding per pooled k×k cell, in the text model's width,
ready to replace the image placeholder tokens of a prompt. Module and tensor names follow the checkpoint
(`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`).

Steps (transformers' `get_image_features`): patch projection + learned (x, y) position table -> N
bidirectional layers with axial 2-D RoPE (first half of each head rotates by x, second half by y) ->
k×k mean pooling over the patch grid, ×√D in float32 -> optional standardization (float32) -> unweighted
RMSNorm and a projection to the text width.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import parse_dtype, read_vision_tensors, resolve
from ..config import VisionConfig, load_model_config, vision_config_of
from ..errors import CheckpointError
from .layers import RMSNorm, apply_rope, gelu_tanh, rope_cos_sin


class ClippableLinear(nn.Module):
    """A bias-free linear layer that, when the config enables it, clamps its input and its output to learned
    scalar bounds (`input_min` / `input_max` / `output_min` / `output_max` buffers)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = self.linear(torch.clamp(x, self.input_min, self.input_max))
        return torch.clamp(x, self.output_min, self.output_max)


def axial_inv_freq(cfg: VisionConfig) -> torch.Tensor:
    """[head_dim // 4] inverse frequencies, shared by the x and the y axis."""
    axis_dim = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float) / axis_dim))


def apply_axial_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x: [B, P, heads, d]. Dims [0, d/2) rotate by the x (column) position, [d/2, d) by the y (row) position,
    each half with rotate-half pairs (j, j + d/4)."""
    cos_x, sin_x, cos_y, sin_y = cos_sin
    half = x.shape[-1] // 2
    return torch.cat([apply_rope(x[..., :half], cos_x, sin_x), apply_rope(x[..., half:], cos_y, sin_y)], dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional GQA attention with q/k norms, an unweighted value norm and scale 1.0."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, clip = cfg.hidden_size, cfg.use_clipped_linears
        self.q_proj = ClippableLinear(d, self.num_heads * self.head_dim, clip)
        self.k_proj = ClippableLinear(d, self.num_kv_heads * self.head_dim, clip)
        self.v_proj = ClippableLinear(d, self.num_kv_heads * self.head_dim, clip)
        self.o_proj = ClippableLinear(self.num_heads * self.head_dim, d, clip)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], key_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, P, D]; key_mask: [B, 1, 1, P] True where a key is a real patch, or None (no padding)."""
        b, p, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(b, p, self.num_heads, self.head_dim)), cos_sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(b, p, self.num_kv_heads, self.head_dim)), cos_sin)
        v = self.v_norm(self.v_proj(x).view(b, p, self.num_kv_heads, self.head_dim))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask, scale=1.0,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, p, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, i, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(d, i, clip)
        self.up_proj = ClippableLinear(d, i, clip)
        self.down_proj = ClippableLinear(i, d, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    """Attention and MLP, each with Gemma's sandwich norms (no layer scalar)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, ...], key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, P, 3·p²] in [0, 1] -> [B, P, D]; padding rows get no position embedding."""
        x = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))  # the model works in [-1, 1]
        clamped = positions.clamp(min=0)
        table = self.position_embedding_table
        pos = F.embedding(clamped[..., 0], table[0]) + F.embedding(clamped[..., 1], table[1])
        return x + pos.masked_fill(padding[..., None], 0.0)


class VisionEncoder(nn.Module):
    """Holds `layers` (the checkpoint's `vision_tower.encoder.layers.*`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """`model.encoder.vision_tower`: patches -> pooled, standardized soft tokens [ΣN, D]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))
        # Not a checkpoint tensor: recomputed on every load (see `init_rope`).
        self.register_buffer("inv_freq", axial_inv_freq(cfg), persistent=False)

    def init_rope(self) -> None:
        """Fill `inv_freq` after the tower was built on the meta device."""
        self.inv_freq = axial_inv_freq(self.config).to(self.patch_embedder.input_proj.weight.device)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, P, 3·p²], positions [B, P, 2] (x, y; padding (-1, -1)) -> [ΣN, D], each image's
        N = (its real patches) / k² soft tokens, images in batch order, each row-major over its pooled grid."""
        cfg = self.config
        k2 = cfg.pooling_kernel_size**2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != cfg.patch_dim or positions.shape != (*pixel_values.shape[:2], 2):
            raise ValueError(f"expected pixel_values [B, P, {cfg.patch_dim}] and positions [B, P, 2], got "
                             f"{list(pixel_values.shape)} and {list(positions.shape)}")
        if pixel_values.shape[1] % k2:
            raise ValueError(f"{pixel_values.shape[1]} patches cannot be pooled by a {cfg.pooling_kernel_size}² kernel")
        padding = (positions == -1).all(dim=-1)  # [B, P]
        if positions.numel() and int(positions.max()) >= cfg.position_embedding_size:
            raise ValueError(f"a patch position {int(positions.max())} is beyond the position table "
                             f"({cfg.position_embedding_size}): the image is larger than this tower takes")
        x = self.patch_embedder(pixel_values, positions, padding)
        dtype = x.dtype
        cos_sin = []
        for axis in (0, 1):  # x, then y
            cos, sin = rope_cos_sin(positions[..., axis], self.inv_freq, dtype)
            cos_sin += [cos, sin]
        key_mask = ~padding[:, None, None, :] if bool(padding.any()) else None
        for layer in self.encoder.layers:
            x = layer(x, tuple(cos_sin), key_mask)
        pooled, valid = pool_patches(x, positions, padding, cfg.pooling_kernel_size)
        out = pooled[valid]  # [ΣN, D] float32
        if cfg.standardize:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out.to(dtype)


def pool_patches(x: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over each k×k cell of the patch grid, ×√D, in float32.

    x [B, P, D] -> (pooled [B, P/k², D] float32, valid [B, P/k²]). Cell index = ⌊x/k⌋ + (W/k)·⌊y/k⌋ with W
    the grid width (largest x + 1), so cells are row-major; padding rows are zeroed and land in cell 0,
    cells no patch reaches are marked invalid."""
    b, p, d = x.shape
    slots = p // (k * k)
    x = x.masked_fill(padding[..., None], 0.0)
    if slots == p:  # k = 1: nothing to pool
        pooled, valid = x.float(), ~padding
    else:
        clamped = positions.clamp(min=0)
        width = clamped[..., 0].amax(dim=-1, keepdim=True) + 1
        cell = clamped[..., 0] // k + (width // k) * (clamped[..., 1] // k)  # [B, P]
        if bool((cell >= slots).any()):
            raise ValueError("patch positions do not form a grid whose sides are multiples of the pooling kernel")
        pooled = torch.zeros(b, slots, d, dtype=torch.float32, device=x.device)
        pooled.scatter_add_(1, cell[..., None].expand(b, p, d), x.float())
        # The reference rounds the mean to the activation dtype before scaling.
        pooled = (pooled / (k * k)).to(x.dtype).float()
        counts = torch.zeros(b, slots, dtype=torch.long, device=x.device).scatter_add_(1, cell, torch.ones_like(cell))
        valid = counts > 0
    return pooled * d**0.5, valid


class VisionEmbedder(nn.Module):
    """`model.encoder.embed_vision`: unweighted RMSNorm, then a projection to the text width (the result
    replaces token embeddings as is: it is not scaled by √hidden like text embeddings)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=False)

    def forward(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(soft_tokens))


class VisionModel(nn.Module):
    """The tower and its projection, named as under `model.encoder.` in the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = VisionEmbedder(cfg)

    def init_rope(self) -> None:
        self.vision_tower.init_rope()

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Image embeddings in the text model's width: [B, P, 3·p²], [B, P, 2] -> [ΣN, text hidden]
        (transformers' `get_image_features(...).pooler_output`)."""
        return self.embed_vision(self.vision_tower(pixel_values, positions))

    def embed_images(self, images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """One image at a time, unpadded: [(pixel_values [P_i, 3·p²], positions [P_i, 2])] -> [[N_i, text
        hidden]]. Padding rows, if any, are dropped first (padding changes nothing but the work done)."""
        out = []
        for pixels, positions in images:
            real = ~(positions == -1).all(dim=-1)
            out.append(self(pixels[real][None], positions[real][None]))
        return out


def load_vision_model(path_or_id: str | Path, dtype: torch.dtype | str = torch.float32,
                      device: torch.device | str = "cpu", offline: bool | None = None,
                      revision: str | None = None) -> VisionModel:
    """The checkpoint's vision tower and `embed_vision` as a `VisionModel` (frozen, in eval mode).
    Raises CheckpointError for a text-only checkpoint, or one whose config names a tower it does not store."""
    folder = resolve(path_or_id, offline=offline, revision=revision)
    vision = vision_config_of(load_model_config(folder))
    if vision is None:
        raise CheckpointError(f"{folder} is a text-only checkpoint: its config.json has no vision tower")
    with torch.device("meta"):
        model = VisionModel(vision).to(parse_dtype(dtype))
    model = model.to_empty(device=device)
    model.init_rope()  # RoPE frequencies are computed, not stored (and stay float32)
    read_vision_tensors(folder, {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
                                 if not n.endswith("inv_freq")})
    model.requires_grad_(False)
    return model.eval()
