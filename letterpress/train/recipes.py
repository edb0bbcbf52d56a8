"""Recipes: a name -> what to train (base checkpoint or config), the data builder and the hyperparameters.

    letterpress train --recipe tiny-reverse --output runs/reverse

A recipe's `hyperparameters` are `TrainConfig` field values; command-line flags override them. Register more
with `register(Recipe(...))` (the Sudoku case study adds one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import TrainError
from ..tokenizer import Tokenizer
from .data import TokenizedDataset, prompt_completion_example
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
    runner: Callable[[TrainConfig], int] | None = None  # its own training loop instead of Trainer (tiny-vlm)

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


# ------------------------------------------------------------------------------------------------ tiny-reverse
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


def reverse_digits_data(tokenizer: Tokenizer, seed: int, n_train: int = 2000,
                        n_eval: int = 100) -> tuple[TokenizedDataset, TokenizedDataset]:
    """"reverse: 3 1 4" -> " 4 1 3": synthetic prompt/completion pairs, to check a set-up end to end."""
    g = torch.Generator().manual_seed(seed)

    def example():
        digits = torch.randint(10, (int(torch.randint(3, 9, (), generator=g)),), generator=g).tolist()
        prompt = "reverse: " + " ".join(map(str, digits))
        return prompt_completion_example(prompt, " " + " ".join(map(str, reversed(digits))), tokenizer)

    return TokenizedDataset(example() for _ in range(n_train)), TokenizedDataset(example() for _ in range(n_eval))


register(Recipe(
    name="tiny-reverse",
    description="smoke test from scratch: a 2-layer DiffusionGemma with the embedded tokenizer on digit reversal "
                "(learns the answer format in minutes on a CPU; getting the digits right takes far longer)",
    build_data=reverse_digits_data,
    model_config=tiny_config(vocab_size=4096),
    hyperparameters=dict(steps=300, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20, beta1=0.9, beta2=0.99,
                         eval_every=100, log_every=10),
))


from . import recipes_builtin  # noqa: E402,F401  (registers sudoku, sudoku-ar, tiny-code)
from . import recipes_tasks  # noqa: E402,F401  (registers tiny-tasks, the default model)
from .vlm import register_recipe as _register_vlm  # noqa: E402

_register_vlm()  # tiny-vlm, the shipped vision-language model
