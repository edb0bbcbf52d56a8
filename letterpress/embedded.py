"""The embedded default model, so that every command runs with no download.

The default is the first shipped of DEFAULT_MODELS (a folder under assets/ with weights), or the shipped model
$LETTERPRESS_DEFAULT_MODEL names: `assets/tiny_tasks` (short reformatting jobs and tool calls in the Gemma 4 chat
format, `letterpress train --recipe tiny-tasks`) once its weights ship, else `assets/tiny_code` (a small code
model, `--recipe tiny-code`). If no weights are present (e.g. a trimmed install), the fallback is a
*placeholder*: a tiny DiffusionGemma with random weights and tiny-code's BPE tokenizer, built deterministically
on first use into the user's cache folder. It exercises every code path but its text is noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import ModelConfig

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PLACEHOLDER_VERSION = 1
DEFAULT_MODELS = ("tiny_tasks", "tiny_code")  # the first shipped one is the default


def placeholder_config(vocab_size: int) -> dict:
    """A DiffusionGemma config of the released shape family, scaled down: sliding + full layers, larger
    full-attention heads, MoE with top-2 of 8 experts."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": 64,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "global_head_dim": 64,
            "num_global_key_value_heads": 1,
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 64,
            "max_position_embeddings": 4096,
            "final_logit_softcapping": 30.0,
            "pad_token_id": 0,
            "eos_token_id": [1, 5],
            "bos_token_id": 2,
        },
    }


def cache_root() -> Path:
    base = os.environ.get("LETTERPRESS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "letterpress")
    return Path(base).expanduser()


def shipped_models() -> dict[str, Path]:
    """Trained models shipped in the package: folders under assets/ that hold weights."""
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / "model.safetensors").is_file()}


def default_model_dir(model_class: Callable[[ModelConfig], torch.nn.Module] | None = None) -> Path:
    """The model a command runs when none is named: `$LETTERPRESS_DEFAULT_MODEL` (a shipped model's folder name,
    e.g. tiny_code) if set, else the first shipped of DEFAULT_MODELS, else the placeholder, which `model_class`
    (DiffusionGemma; passed in, as this module sits below the model) builds on first use."""
    shipped = shipped_models()
    chosen = os.environ.get("LETTERPRESS_DEFAULT_MODEL")
    if chosen:
        if chosen not in shipped:
            raise CheckpointError(f"LETTERPRESS_DEFAULT_MODEL={chosen}: not a shipped model; shipped: "
                                  f"{', '.join(shipped) or 'none'}")
        return shipped[chosen]
    for name in DEFAULT_MODELS:
        if name in shipped:
            return shipped[name]
    return build_placeholder(cache_root() / f"placeholder-v{PLACEHOLDER_VERSION}", model_class)


def build_placeholder(folder: Path, model_class: Callable[[ModelConfig], torch.nn.Module] | None) -> Path:
    """Build (once) the random-weight placeholder checkpoint in the released format."""
    if (folder / "model.safetensors").is_file():
        return folder
    if model_class is None:
        raise CheckpointError(f"no model is shipped under {ASSETS} and the placeholder at {folder} is not built "
                              "yet: load the default model once (LLM(None), DiffusionGemma.from_pretrained())")
    from .checkpoint import save_model
    from .config import model_config_from_dict
    from .tokenizer import Tokenizer

    tokenizer_dir = ASSETS / "tiny_code"
    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    config = placeholder_config(vocab)
    model = model_class(model_config_from_dict(config))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    generation = {"max_new_tokens": 64, "eos_token_id": [1, 5], "pad_token_id": 0}
    return save_model(model, folder, config, generation, {f: tokenizer_dir / f for f in TOKENIZER_FILES})
