"""A recipe (a name -> what to train, the data builder and the hyperparameters) and the registry of recipes.

The recipes themselves are registered by the modules that define them (recipes.py, recipes_builtin.py,
recipes_tasks.py, ...), which import this one; `letterpress.train.recipes` imports them all and is where
callers look recipes up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import TrainError
from ..tokenizer import Tokenizer
from .data import TokenizedDataset
from .trainer import EvalHook, TrainConfig

# (tokenizer, seed) -> (training set, held-out set or None)
DataBuilder = Callable[[Tokenizer, int], tuple[TokenizedDataset, TokenizedDataset | None]]


@dataclass
class Recipe:
    name: str
    description: str
    build_data: DataBuilder | None = None  # None: the run needs --data
    model: str | None = None  # checkpoint to fine-tune ...
    model_config: dict | None = None  # ... or a config to train from scratch
    tokenizer: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value
    evaluate: EvalHook | None = None  # extra metrics at each evaluation (e.g. exact-solve rate by generation)

    def config(self, **overrides: Any) -> TrainConfig:
        """The recipe's TrainConfig, then `overrides` (e.g. from the command line) on top."""
        known = {f.name for f in fields(TrainConfig)}
        values = {"model": self.model, "model_config": self.model_config, "tokenizer": self.tokenizer,
                  **self.hyperparameters, **overrides}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"recipe {self.name}: unknown settings {unknown}")
        return replace(TrainConfig(), **values)


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise TrainError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES)) or 'none'}")
    return RECIPES[name]


# ------------------------------------------------------------------------------------------ model configs
def small_config(*, vocab_size: int, canvas_length: int, hidden_size: int, head_dim: int, layer_types: list[str],
                 sliding_window: int, max_position_embeddings: int, eos_token_id: tuple[int, ...] = (1, 5)) -> dict:
    """config.json of a small DiffusionGemma from scratch, the shape family our recipes share: 4 heads (2 KV;
    1 KV head, twice as wide, on full-attention layers), dense MLP 2x hidden, 4 experts top-2 of 1x hidden."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": canvas_length, "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size, "num_hidden_layers": len(layer_types), "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": head_dim, "global_head_dim": 2 * head_dim,
            "num_global_key_value_heads": 1, "sliding_window": sliding_window, "layer_types": list(layer_types),
            "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": hidden_size,
            "max_position_embeddings": max_position_embeddings, "final_logit_softcapping": 30.0,
            "pad_token_id": 0, "eos_token_id": list(eos_token_id), "bos_token_id": 2,
        },
    }


def tiny_config(vocab_size: int, canvas_length: int = 16) -> dict:
    """A DiffusionGemma a CPU trains in minutes: 2 layers (sliding + full), hidden 64, 4 experts."""
    return small_config(vocab_size=vocab_size, canvas_length=canvas_length, hidden_size=64, head_dim=16,
                        layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                        max_position_embeddings=1024)
