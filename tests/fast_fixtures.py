"""Small random DiffusionGemma models (our own module, no transformers) for the fast-path and quantization
tests, and a checkpoint folder for `LLM`."""

from __future__ import annotations

from pathlib import Path

import torch

from letterpress.checkpoint import save_model
from letterpress.config import model_config_from_dict
from letterpress.model import DiffusionGemma

TEXT = dict(
    model_type="diffusion_gemma_text", vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    sliding_window=8, num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=512,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    eos_token_id=[1], pad_token_id=0, bos_token_id=2,
)


def config_dict(canvas: int = 16, **text) -> dict:
    return {"model_type": "diffusion_gemma", "canvas_length": canvas, "tie_word_embeddings": True,
            "text_config": {**TEXT, **text}}


@torch.no_grad()
def random_model(seed: int = 0, canvas: int = 16, weight_std: float = 0.08, embed_std: float = 0.5,
                 dtype: torch.dtype = torch.float32, qk_scale: float = 1.0, **text) -> DiffusionGemma:
    """Random weights with every norm, scale and layer scalar perturbed away from 1 (so each one matters),
    and embeddings large enough for peaked, non-trivial distributions. `qk_scale` < 1 shrinks the q/k norm
    weights: attention runs at scale 1.0, so unit-norm random queries and keys give near-one-hot attention
    that flips under any perturbation (a chaotic model); trained models do not behave like that."""
    model = DiffusionGemma(model_config_from_dict(config_dict(canvas, **text)))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.normal_(0.0, weight_std, generator=g)
    model.embed_tokens.weight.normal_(0.0, embed_std, generator=g)
    for layer in model.layers:
        layer.self_attn.q_norm.weight.mul_(qk_scale)
        layer.self_attn.k_norm.weight.mul_(qk_scale)
    for layer in model.layers:
        layer.encoder_scalar.copy_(0.5 + torch.rand(1, generator=g))
        layer.decoder_scalar.copy_(0.5 + torch.rand(1, generator=g))
    return model.to(dtype).eval()


def save_checkpoint(folder: Path, seed: int = 0, canvas: int = 16, qk_scale: float = 1.0, **text) -> Path:
    model = random_model(seed, canvas, qk_scale=qk_scale, **text)
    return save_model(model, folder, config_dict(canvas, **text), {"eos_token_id": [1], "pad_token_id": 0})


def tensors(model) -> dict[str, torch.Tensor]:
    """State dict with float8 viewed as bytes (torch.equal does not compare float8)."""
    return {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v for k, v in model.state_dict().items()}


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The two models hold bit-identical tensors under the same names."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
