"""Recipes: a name -> what to train (base checkpoint or config), the data builder and the hyperparameters.

    letterpress train --recipe tiny-reverse --output runs/reverse

A recipe's `hyperparameters` are `TrainConfig` field values; command-line flags override them. Register more
with `register(Recipe(...))` (recipe.py; the Sudoku case study adds one). This module imports every module that
registers recipes, so `RECIPES` / `get_recipe` here know them all; those modules import recipe.py, not this one.
"""

from __future__ import annotations

import torch

from ..tokenizer import Tokenizer
from .data import TokenizedDataset, prompt_completion_example
from .recipe import RECIPES, DataBuilder, Recipe, get_recipe, register, small_config, tiny_config  # noqa: F401


# ------------------------------------------------------------------------------------------------ tiny-reverse
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
from . import vlm  # noqa: E402,F401  (registers tiny-vlm and tiny-vlm-tower, the tiny vision-language model)
