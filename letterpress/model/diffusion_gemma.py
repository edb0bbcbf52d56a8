"""The DiffusionGemma text model: one stack of layers run two ways.

- `encode`: causal pass over new context tokens (the prompt, then each finished canvas) that appends their
  keys/values to the KV cache.
- `denoise`: bidirectional pass over a canvas that reads the cache (never writes it) and returns logits.

Encoder and decoder share every weight; only `layer_scalar` exists twice (`encoder_scalar`,
`decoder_scalar`), and only the decoder uses the self-conditioning block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, PagedKVCache, layer_kinds, plan_pool, visible_from
from ..chunks import position_slices
from ..checkpoint import (allocate, check_headers, checkpoint_dtype, load_weights, parse_dtype, plan_weights, resolve,
                          stored_quantization, swap_quantized_modules, weight_files)
from ..config import SLIDING, LayerSpec, ModelConfig, TextConfig, load_model_config
from ..embedded import default_model_dir
from ..quant import CT_METHOD, check_format, ct_formats
from .layers import (Experts, GatedMLP, RMSNorm, Router, apply_rope, gelu_tanh, init_parameters, rope_cos_sin,
                     rope_inv_freq)

Cache = KVCache | PagedKVCache  # what `encode` / `denoise` accept (letterpress.cache)

log = logging.getLogger(__name__)


def check_token_ids(ids, name: str) -> None:
    """`encode` / `denoise` take an integer tensor [batch, tokens]; say so instead of failing deep inside."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [batch, tokens], not "
                        f"{type(ids).__name__}: e.g. torch.tensor([ids]) for one sequence")
    if ids.ndim != 2 or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor of shape [batch, tokens], got {ids.dtype} of shape "
                        f"{list(ids.shape)}")


def encode_rows(input_ids, slots: torch.Tensor | None,
                input_lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode`'s checked rows: (cache slots [B], valid tokens per row [B]) on the ids' device; every row
    in slot order and every token valid where not given."""
    check_token_ids(input_ids, "input_ids")
    b, t = input_ids.shape
    device = input_ids.device
    slots = torch.arange(b, device=device) if slots is None else slots.to(device)
    input_lengths = torch.full((b,), t, device=device) if input_lengths is None else input_lengths.to(device)
    return slots, input_lengths


def scatter_soft_tokens(embeds: torch.Tensor, soft_tokens: torch.Tensor | None,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write `soft_tokens` [M, H] into `embeds` [B, T, H] where `mask` [B, T] is set (row-major), and number
    each maximal run of set positions per row: (embeds, blocks [B, T], -1 outside runs)."""
    count = int(mask.sum())
    got = 0 if soft_tokens is None else soft_tokens.shape[0]
    if got != count:
        raise ValueError(f"{count} image placeholder positions but {got} soft tokens")
    if count:
        embeds = embeds.masked_scatter(mask[..., None], soft_tokens.to(embeds.device, embeds.dtype))
    previous = F.pad(mask[:, :-1], (1, 0), value=False)
    run = (mask & ~previous).long().cumsum(dim=1) - 1
    return embeds, torch.where(mask, run, -1)


def same_block(blocks: torch.Tensor, key_index: torch.Tensor, valid: torch.Tensor, keys: int) -> torch.Tensor:
    """[B, T, keys]: query t and key k are tokens of the same image run. `key_index` [B, T] is each chunk
    token's column among the keys; runs never cross a chunk, so earlier keys are never in a run."""
    b, t = blocks.shape
    key_blocks = torch.full((b, keys + 1), -1, dtype=blocks.dtype, device=blocks.device)  # last column: discard
    column = torch.where(valid, key_index, keys)
    key_blocks.scatter_(1, column, torch.where(valid, blocks, -1))
    key_blocks = key_blocks[:, :keys]
    return (blocks[:, :, None] == key_blocks[:, None, :]) & (blocks[:, :, None] >= 0)


# (layer index, new keys [B, T, kvh, d], new values) -> all keys/values to attend to, [B, kvh, S, d] each
KVSource = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    """GQA attention with q/k norms and an unscaled value norm. Scale is 1.0 (the q/k norms set the scale).
    Full-attention layers have no v_proj: values are the raw (pre-norm, pre-RoPE) keys."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = spec.head_dim
        self.num_kv_heads = spec.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias) if spec.is_sliding else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                kv_source: KVSource, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        keys, values = kv_source(layer_idx, k, self.v_norm(v))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=1.0, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Layer(nn.Module):
    """Attention, then a dense MLP and a MoE side by side, each with Gemma's sandwich norms."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec)
        self.mlp = GatedMLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # The tie between encoder and decoder covers weights, not these buffers: keep both.
        self.register_buffer("encoder_scalar", torch.ones(1))
        self.register_buffer("decoder_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                kv_source: KVSource, layer_idx: int, scalar: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_source, layer_idx)
        x = x + self.post_attention_layernorm(attn)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat)  # the router reads the raw residual stream
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).reshape(x.shape)
        x = x + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return x * scalar


class SelfConditioning(nn.Module):
    """Feeds the previous step's probabilities back: soft embeddings -> pre-norm -> gated MLP, added to the
    canvas embeddings, then an unscaled post-norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, canvas_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        if soft_embeds is None:
            # A zero signal gives an exactly zero MLP output (gelu(0) = 0), so skip the matmuls.
            return self.post_norm(canvas_embeds)
        normed = self.pre_norm(soft_embeds)
        signal = self.down_proj(gelu_tanh(self.gate_proj(normed)) * self.up_proj(normed))
        return self.post_norm(canvas_embeds + signal)


class DiffusionGemma(nn.Module):
    """DiffusionGemma's text path. Build with `DiffusionGemma.from_pretrained(path_or_hub_id)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        cfg = config.text
        self.text_config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, spec) for spec in cfg.layers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for layer_type in cfg.rope:
            self.register_buffer(f"inv_freq_{layer_type}", torch.empty(0), persistent=False)
        self.init_rope()
        self.fast_attention = False  # `fast.decoder_attention` in `denoise`; set by `fast.apply_fast_path`
        # Bumped by what changes the weights in place after loading (an adapter loaded, quantizing): the engine's
        # prefix cache then forgets the keys and values the old weights wrote.
        self.weights_version = 0

    def init_rope(self) -> None:
        """(Re)compute the RoPE frequencies in float32: after `to_empty` or a dtype change they are garbage."""
        cfg = self.text_config
        for layer_type, rope in cfg.rope.items():
            head_dim = next((s.head_dim for s in cfg.layers if s.layer_type == layer_type), cfg.head_dim)
            setattr(self, f"inv_freq_{layer_type}", rope_inv_freq(rope, head_dim).to(self.embed_tokens.weight.device))

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
                        device: torch.device | str = "cpu", offline: bool | None = None,
                        revision: str | None = None, quantization: str | None = None,
                        check_finite: bool = True) -> "DiffusionGemma":
        """A checkpoint folder or Hub id; None is the embedded default model, as for `LLM(None)`. `load_model`
        below says what loading does.
        `quantization` ("int8", "int4", "fp8"): quantize each weight while loading (letterpress.quant);
        a compressed-tensors checkpoint loads quantized as stored either way."""
        if path_or_id is None:
            path_or_id = default_model_dir(cls)
        return load_model(path_or_id, dtype=dtype, device=device, offline=offline, revision=revision,
                          quantization=quantization, check_finite=check_finite)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "DiffusionGemma":
        """Fresh weights for training from scratch: normal(0, std) matrices, unit norms and scales."""
        init_parameters(self, std, generator)
        for layer in self.layers:
            layer.encoder_scalar.fill_(1.0)
            layer.decoder_scalar.fill_(1.0)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, num_slots: int, capacity: int) -> KVCache:
        """A contiguous cache (every position of every row kept): training, tests, benchmarks."""
        return KVCache(self.text_config, num_slots, capacity, self.dtype, self.device)

    def new_paged_cache(self, num_slots: int, max_model_len: int, block_size: int = 16,
                        num_blocks: dict[str, int] | None = None, budget_bytes: int | None = None,
                        prefill_chunk: int = 2048, enable_prefix_caching: bool = True) -> PagedKVCache:
        """The engine's block cache (letterpress.cache). `num_blocks` per layer kind, else planned from
        `budget_bytes` (None: room for `num_slots` rows of `max_model_len` tokens)."""
        if num_blocks is None:
            num_blocks = plan_pool(layer_kinds(self.text_config), self.dtype, block_size, num_slots, max_model_len,
                                   prefill_chunk, budget_bytes)
        return PagedKVCache(self.text_config, num_slots, max_model_len, block_size, num_blocks, self.dtype,
                            self.device, prefill_chunk, enable_prefix_caching)

    # ----------------------------------------------------------------------------------------------- pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # The scale is rounded to the weight dtype first, as the reference does.
        scale = torch.tensor(self.text_config.hidden_size**0.5).to(self.dtype)
        return self.embed_tokens(ids) * scale

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head and soft-capping, in float32: [.., hidden] -> [.., vocab]. Without autograd it
        runs a chunk of positions at a time into the float32 output, so the only other [.., vocab] tensors
        are a chunk's (at the released vocabulary the whole canvas is 268 MB per row per tensor)."""
        cap = self.text_config.final_logit_softcapping
        weight = self.embed_tokens.weight
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            logits = F.linear(hidden, weight).float()  # training: autograd needs out-of-place ops
            return torch.tanh(logits / cap) * cap if cap else logits
        vocab = weight.shape[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(flat.shape[0], vocab, dtype=torch.float32, device=hidden.device)
        for s in position_slices(flat.shape[0], vocab):
            chunk = F.linear(flat[s], weight).float()
            if cap:
                torch.tanh(chunk.div_(cap), out=out[s]).mul_(cap)  # the same ops as tanh(x / cap) * cap
            else:
                out[s] = chunk
            del chunk  # before the next chunk's
        return out.reshape(*hidden.shape[:-1], vocab)

    def soft_embeddings(self, logits: torch.Tensor | None, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Self-conditioning input: softmax (float32) of the previous step's logits times the embedding.
        A caller that already has that softmax (the fused sampler) passes it as `probs` instead. A chunk of
        positions at a time: no [.., vocab] temporary beyond a chunk's."""
        source = probs if probs is not None else logits
        weight = self.embed_tokens.weight
        vocab = source.shape[-1]
        flat = source.reshape(-1, vocab)
        scale = torch.tensor(self.text_config.hidden_size**0.5).to(self.dtype)
        out = torch.empty(flat.shape[0], weight.shape[1], dtype=self.dtype, device=source.device)
        for s in position_slices(flat.shape[0], vocab):
            chunk = flat[s] if probs is not None else torch.softmax(flat[s], dim=-1, dtype=torch.float32)
            out[s] = (chunk.to(self.dtype) @ weight) * scale
            del chunk
        return out.reshape(*source.shape[:-1], weight.shape[1])

    def _rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: rope_cos_sin(positions, getattr(self, f"inv_freq_{t}"), self.dtype) for t in self.text_config.rope}

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor],
                    kv_source: KVSource, scalar_name: str) -> torch.Tensor:
        rope = self._rope(positions)
        for i, (layer, spec) in enumerate(zip(self.layers, self.text_config.layers)):
            cos, sin = rope[spec.layer_type]
            x = layer(x, cos, sin, masks[spec.layer_type], kv_source, i, getattr(layer, scalar_name))
        return self.norm(x)

    def _window(self, layer_type: str) -> int | None:
        return self.text_config.sliding_window if layer_type == SLIDING else None

    def _read_starts(self, cache: Cache, base: torch.Tensor) -> dict[str, int]:
        """First cache position the plain paths read per layer type. A paged cache holds nothing before the
        first position some row can still see (`visible_from`), so reads start there; the contiguous cache
        keeps every position, and reading it from 0 under the mask keeps its results bit for bit what they
        were before the paged cache existed."""
        layer_types = set(self.text_config.layer_types)
        if isinstance(cache, KVCache) or base.numel() == 0:
            return {lt: 0 for lt in layer_types}
        return {lt: int(visible_from(base, self._window(lt)).min()) for lt in layer_types}

    # ----------------------------------------------------------------------------------------------- encode
    def encode(self, input_ids: torch.Tensor, cache: Cache, slots: torch.Tensor | None = None,
               input_lengths: torch.Tensor | None = None, soft_tokens: torch.Tensor | None = None,
               soft_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append `input_ids` [B, T] (right-padded; row b has `input_lengths[b]` real tokens) to the cache
        slots `slots` [B], continuing each slot's positions. Returns final hidden states [B, T, hidden].

        Images: `soft_token_mask` [B, T] marks the positions whose embeddings are replaced by the rows of
        `soft_tokens` [M, hidden] (image features from `VisionModel`, in row-major order over (row, position),
        as transformers' `masked_scatter`). Each maximal run of marked positions is one image (or video
        frame) and attends bidirectionally within itself on every layer, sliding or full; everything else
        stays causal (the checkpoint's `use_bidirectional_attention: "vision"`). A run must lie in one call:
        its later tokens are not in the cache yet when an earlier chunk is encoded."""
        slots, input_lengths = encode_rows(input_ids, slots, input_lengths)
        b, t = input_ids.shape
        device = input_ids.device
        cache.begin_append(slots, input_lengths)
        base = cache.lengths[slots]  # [B] tokens already cached per row
        offsets = torch.arange(t, device=device)
        positions = base[:, None] + offsets  # [B, T]
        query_valid = offsets[None, :] < input_lengths[:, None]
        key_len = int((base + input_lengths).max())
        starts = self._read_starts(cache, base)
        x = self.embed(input_ids)
        blocks = None
        if soft_token_mask is not None:
            x, blocks = scatter_soft_tokens(x, soft_tokens, soft_token_mask.to(device) & query_valid)
        masks = {lt: self._encoder_mask(lt, positions, base, base + input_lengths, query_valid, start, key_len, blocks)
                 for lt, start in starts.items()}
        layer_types = self.text_config.layer_types

        def kv_source(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cache.write(layer_idx, slots, positions, query_valid, k, v)
            return cache.read(layer_idx, slots, starts[layer_types[layer_idx]], key_len)

        hidden = self._run_layers(x, positions, masks, kv_source, "encoder_scalar")
        cache.advance(slots, input_lengths, input_ids)
        return hidden

    def _encoder_mask(self, layer_type: str, positions: torch.Tensor, base: torch.Tensor, total: torch.Tensor,
                      query_valid: torch.Tensor, start: int, key_len: int,
                      blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask [B, 1, T, key_len - start] over cache positions [start, key_len) (the chunk is
        already written there). `blocks` [B, T]: image run ids (-1: text) whose tokens see each other."""
        qp = positions[:, :, None]
        kp = torch.arange(start, key_len, device=positions.device)[None, None, :]
        allowed = kp < total[:, None, None]
        window = self._window(layer_type)
        if self.text_config.encoder_is_causal:
            allowed = allowed & (kp <= qp)
            if window is not None:
                allowed = allowed & (kp > qp - window)
        elif window is not None:
            # Bidirectional sliding window over the chunk, reading only what the sliding cache retained.
            allowed = allowed & ((qp - kp).abs() <= window) & (kp >= visible_from(base, window)[:, None, None])
        if blocks is not None:
            # transformers' `block_sequence_ids` term, not clamped by the sliding window
            allowed = allowed | same_block(blocks, positions - start, query_valid, key_len - start)
        # Padding queries attend to everything: their outputs are discarded, this only keeps them finite.
        allowed = allowed | ~query_valid[:, :, None]
        return allowed[:, None]

    # ----------------------------------------------------------------------------------------------- denoise
    def denoise(self, canvas_ids: torch.Tensor, cache: Cache, slots: torch.Tensor | None = None,
                self_conditioning_logits: torch.Tensor | None = None,
                self_conditioning_mask: torch.Tensor | None = None,
                self_conditioning_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over canvases [B, C] that read cache slots `slots` [B]. Returns float32,
        soft-capped logits [B, C, vocab]. `self_conditioning_logits` [B, C, vocab] are the previous step's
        processed logits (or pass their softmax as `self_conditioning_probs`); rows where
        `self_conditioning_mask` [B] is False get a zero signal."""
        check_token_ids(canvas_ids, "canvas_ids")
        b, c = canvas_ids.shape
        device = canvas_ids.device
        slots = torch.arange(b, device=device) if slots is None else slots.to(device)
        base = cache.lengths[slots]
        positions = base[:, None] + torch.arange(c, device=device)
        if self.fast_attention:
            from .fast import decoder_attention

            masks, kv_source = decoder_attention(self, cache, slots, base, c)
        else:
            key_len = int(base.max()) if b else 0
            starts = self._read_starts(cache, base)
            masks = {lt: self._decoder_mask(lt, base, start, key_len, c) for lt, start in starts.items()}
            layer_types = self.text_config.layer_types

            def kv_source(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = cache.read(layer_idx, slots, starts[layer_types[layer_idx]], key_len)
                return torch.cat([keys, k.transpose(1, 2)], dim=2), torch.cat([values, v.transpose(1, 2)], dim=2)

        soft = None
        if self_conditioning_logits is not None or self_conditioning_probs is not None:
            soft = self.soft_embeddings(self_conditioning_logits, self_conditioning_probs)
            if self_conditioning_mask is not None:
                soft = soft * self_conditioning_mask.to(device=device, dtype=soft.dtype)[:, None, None]
        x = self.self_conditioning(self.embed(canvas_ids), soft)
        hidden = self._run_layers(x, positions, masks, kv_source, "decoder_scalar")
        return self.lm_logits(hidden)

    def _decoder_mask(self, layer_type: str, base: torch.Tensor, start: int, key_len: int, canvas: int) -> torch.Tensor:
        """[B, 1, 1, key_len - start + canvas]: every canvas query sees the same keys, the cached prefix (last
        window - 1 tokens on sliding layers) and the whole canvas. Keys are cache positions [start, key_len)."""
        kp = torch.arange(start, key_len, device=base.device)[None, :]
        cached = (kp < base[:, None]) & (kp >= visible_from(base, self._window(layer_type))[:, None])
        canvas_part = torch.ones(base.shape[0], canvas, dtype=torch.bool, device=base.device)
        return torch.cat([cached, canvas_part], dim=1)[:, None, None, :]


def load_model(path_or_id: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
               offline: bool | None = None, revision: str | None = None, quantization: str | None = None,
               check_finite: bool = True) -> DiffusionGemma:
    """Build the model on the meta device, swap in quantized modules where the checkpoint stores quantized
    weights (compressed-tensors) or `quantization` asks for them, allocate on `device`, then read each
    tensor into its place: float tensors are cast, quantized while loading or taken as stored. Peak memory
    is about the loaded model plus the largest float tensor (one expert's slice for packed experts).

    `dtype`: a torch dtype, its name, or "auto" (the checkpoint's own, `checkpoint_dtype`). Every stored
    header is checked (name, shape, float dtype) before anything is allocated. `check_finite`: refuse
    float weights holding NaN or infinity (one sum per tensor, see README)."""
    folder = resolve(path_or_id, offline=offline, revision=revision)
    config = load_model_config(folder)
    dtype = parse_dtype(dtype, auto=checkpoint_dtype(folder, config) if dtype == "auto" else None)
    fmt = check_format(quantization)
    stored_config = stored_quantization(folder)
    stored = ct_formats(stored_config) if stored_config else set()
    if fmt and stored and stored != {fmt}:  # legitimate (the layers it left in float get fmt), but not as asked
        log.warning("%s is stored quantized (%s): those layers load as stored; quantization=%r applies only to "
                    "the layers it left in float", folder.name, ", ".join(sorted(stored)), fmt)
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
    files = weight_files(folder)
    plan = plan_weights(model, folder, files)
    check_headers(model, plan, files)  # refuse a mismatched checkpoint before allocating
    quantized = swap_quantized_modules(model, plan, fmt)
    model = allocate(model, device, folder)
    model.init_rope()
    load_weights(model, folder, plan, quantized, check_finite=check_finite)
    model.checkpoint_dir = folder
    model.quantization = fmt or (CT_METHOD if stored_config else None)
    return model.eval()
