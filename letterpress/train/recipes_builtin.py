"""Built-in recipes of the shipped models: `sudoku`, `sudoku-ar` (its autoregressive baseline) and `tiny-code`.

    letterpress train --recipe sudoku --output runs/sudoku          # -> letterpress/assets/sudoku
    letterpress train --recipe sudoku-ar --output runs/sudoku-ar    # same backbone, next-token loss only
    letterpress train --recipe tiny-code --output runs/tiny-code    # -> letterpress/assets/tiny_code

Registered from recipes.py. The defaults are the settings the shipped models were trained with (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .. import sudoku as S
from ..embedded import ASSETS
from ..tokenizer import Tokenizer
from .data import TokenizedDataset
from .loss import Example, LossConfig
from .recipes import Recipe, register

# ---------------------------------------------------------------------------------------------------- Sudoku
SUDOKU_DIR = ASSETS / "sudoku"
SUDOKU_GIVENS = (50, 60)  # filled cells per puzzle, inclusive: 21-31 blanks (easy puzzles: a CPU budget)
SUDOKU_TRAIN_SEED = 1_000  # base puzzles of the training stream: seed SUDOKU_TRAIN_SEED + recipe seed
SUDOKU_HELD_OUT_SEED = 777_777  # the 1,000 held-out puzzles (benchmarks/sudoku.py, tests)
SUDOKU_BASE_PUZZLES = 4_000  # generated puzzles; `augment` turns them into the training stream
SUDOKU_STREAM = 60_000  # augmented training examples (the run visits each at most once at the default steps)
SUDOKU_CANVAS = 96  # 81 cells + EOS, the rest EOS fill


def build_sudoku_tokenizer(out_dir: Path = SUDOKU_DIR) -> Path:
    """A word-level tokenizer: ids 0..6 the special tokens of bpe.SPECIAL_TOKENS, then the digits 0-9 (7..16).
    Every digit is its own token; decoding concatenates (81 cells <-> 81 characters)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    from .bpe import SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({str(d): len(SPECIAL_TOKENS) + d for d in range(10)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                       special_tokens=[("<bos>", bos)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True,
              "model_max_length": 256}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def sudoku_config(vocab_size: int = 17) -> dict:
    """2.2M parameters: hidden 128, 6 layers (sliding, sliding, full) x 2, 4 experts top-2, canvas 96."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": SUDOKU_CANVAS, "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1, "sliding_window": 256,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 128, "max_position_embeddings": 512,
            "final_logit_softcapping": 30.0, "pad_token_id": 0, "eos_token_id": [1], "bos_token_id": 2,
        },
    }


def sudoku_example(puzzle: str, solution: str, tokenizer: Tokenizer) -> Example:
    """prompt = <bos> + the 81 cells ('0' blank); target = the 81 digits of the solution."""
    return Example(prompt=tokenizer.encode(puzzle, add_special_tokens=True), target=tokenizer.encode(solution))


def held_out_puzzles(n: int = 1000) -> list[tuple[str, str]]:
    """The held-out (puzzle, solution) pairs: their own seed, never in a training stream (checked by
    `check_disjoint`)."""
    return S.generate(n, SUDOKU_GIVENS, SUDOKU_HELD_OUT_SEED)


def sudoku_training_pairs(seed: int, n_base: int = SUDOKU_BASE_PUZZLES,
                          n_stream: int = SUDOKU_STREAM) -> list[tuple[str, str]]:
    base = S.generate(n_base, SUDOKU_GIVENS, SUDOKU_TRAIN_SEED + seed)
    rng = random.Random(SUDOKU_TRAIN_SEED + seed + 1)
    pairs = list(base)
    while len(pairs) < n_stream:
        pairs.append(S.augment(*base[len(pairs) % n_base], rng))
    return pairs


def check_disjoint(train: list[tuple[str, str]], held_out: list[tuple[str, str]]) -> None:
    """Fail if a held-out puzzle (or its solution grid) occurs in the training stream."""
    puzzles, solutions = {p for p, _ in train}, {s for _, s in train}
    clash = [p for p, s in held_out if p in puzzles or s in solutions]
    if clash:
        raise RuntimeError(f"{len(clash)} held-out Sudoku puzzles collide with the training stream")


def sudoku_data(tokenizer: Tokenizer, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    train = sudoku_training_pairs(seed)
    held_out = held_out_puzzles()
    check_disjoint(train, held_out)
    return (TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in train),
            TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in held_out[:256]))


SUDOKU_HYPERPARAMETERS = dict(steps=600, batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=50, beta1=0.9,
                              beta2=0.99, weight_decay=0.01, eval_every=0, log_every=20, eval_examples=256,
                              save_every=100, tokenizer=str(SUDOKU_DIR), device="cpu")
# The diffusion model spends its compute on the diffusion loss alone; the baseline on the next-token loss alone
# (no decoder passes). Per step both cost about the same: the diffusion model's encoder pass over the 82-token
# prompt plus two decoder passes over the 96-token canvas (one without gradient), vs the baseline's encoder
# pass over the 163-token prompt + solution.
register(Recipe(
    name="sudoku",
    description=f"Sudoku case study, from scratch: a 6-layer DiffusionGemma (hidden 128, canvas {SUDOKU_CANVAS}) on "
                f"generated puzzles with {SUDOKU_GIVENS[0]}-{SUDOKU_GIVENS[1]} givens, augmented; diffusion loss only",
    build_data=sudoku_data,
    model_config=sudoku_config(),
    hyperparameters={**SUDOKU_HYPERPARAMETERS, "loss": LossConfig(encoder_loss_weight=0.0)},
))

register(Recipe(
    name="sudoku-ar",
    description="the Sudoku case study's autoregressive baseline: the same backbone, data and steps, trained "
                "causally by the encoder's next-token loss alone (diffusion loss weight 0)",
    build_data=sudoku_data,
    model_config=sudoku_config(),
    # 780 steps: about the same training FLOPs as the diffusion model's 600 (its steps cost ~1.3x: see above)
    hyperparameters={**SUDOKU_HYPERPARAMETERS, "steps": 780,
                     "loss": LossConfig(encoder_loss_weight=1.0, diffusion_loss_weight=0.0, self_conditioning_prob=0.0)},
))


# ------------------------------------------------------------------------------------------------- tiny-code
TINY_CODE_DIR = ASSETS / "tiny_code"
TINY_CODE_HELD_OUT = ("json", "email", "http")  # kept out of training (and of the tokenizer's corpus)
TINY_CODE_CANVAS = 64


def tiny_code_config(vocab_size: int = 4096) -> dict:
    """A DiffusionGemma of the released shape family, small: hidden 192, 4 layers (3 sliding, 1 full),
    4 experts top-2, canvas 64."""
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": TINY_CODE_CANVAS, "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": 192,
            "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 48, "global_head_dim": 96, "num_global_key_value_heads": 1, "sliding_window": 128,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
            "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 192, "max_position_embeddings": 4096,
            "final_logit_softcapping": 30.0, "pad_token_id": 0, "eos_token_id": [1, 5], "bos_token_id": 2,
        },
    }


def code_windows(tokenizer: Tokenizer, seed: int, n: int, files: list[Path],
                 target_tokens: int = TINY_CODE_CANVAS - 1) -> TokenizedDataset:
    """Completion examples from source files: half are "def ...:" lines (the prompt ends at the colon, after
    up to a few preceding lines), half random windows starting at a line; prompt 8-96 tokens, target the next
    `target_tokens` tokens (one canvas with its EOS)."""
    from .bpe import read_source

    rng = random.Random(seed)
    sources = []
    for path in files:
        try:
            lines = read_source(path).splitlines(keepends=True)
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        if lines:
            sources.append(lines)
    defs = [(f, i) for f, lines in enumerate(sources) for i, line in enumerate(lines)
            if line.lstrip().startswith(("def ", "async def ", "class ")) and line.rstrip().endswith(":")]
    texts = []
    for k in range(n):
        if k % 2 == 0 and defs:
            f, i = defs[rng.randrange(len(defs))]
            lines = sources[f]
            start = max(0, i - rng.randint(0, 4))
            head = "".join(lines[start:i]) + lines[i].rstrip("\n")
            tail = "".join(lines[i:i + 12])[len(lines[i].rstrip("\n")):]
        else:
            lines = sources[rng.randrange(len(sources))]
            start = rng.randrange(len(lines))
            text = "".join(lines[start:start + 30])
            cut = rng.randint(20, 400)
            # cut at a line end when there is one near
            nl = text.find("\n", cut)
            cut = nl if 0 <= nl < cut + 80 else cut
            head, tail = text[:cut], text[cut:]
        texts.append((head, tail))
    heads = tokenizer._backend.encode_batch([h for h, _ in texts], add_special_tokens=True)
    tails = tokenizer._backend.encode_batch([t for _, t in texts], add_special_tokens=False)

    def examples():
        for h, t in zip(heads, tails):
            prompt = h.ids[-96:] if len(h.ids) > 96 else h.ids
            if len(h.ids) > 96:
                prompt = [h.ids[0]] + prompt[1:]
            target = t.ids[:target_tokens]
            if len(prompt) >= 2 and len(target) >= 8:
                yield Example(prompt=prompt, target=target)

    return TokenizedDataset(examples())


def tiny_code_data(tokenizer: Tokenizer, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    from .bpe import stdlib_python_files

    files = stdlib_python_files(exclude=TINY_CODE_HELD_OUT)
    kept = set(files)
    held = [p for p in stdlib_python_files() if p not in kept]  # json, email, http: the held-out loss
    train = code_windows(tokenizer, seed, 12_000, files)
    held_out = code_windows(tokenizer, seed + 1, 512, held) if held else None
    return train, held_out


register(Recipe(
    name="tiny-code",
    description="the embedded default model: a 6-layer DiffusionGemma (hidden 256) trained from scratch on the "
                "Python standard library (json, email and http held out) with the embedded BPE tokenizer",
    build_data=tiny_code_data,
    model_config=tiny_code_config(),
    tokenizer=str(TINY_CODE_DIR),
    hyperparameters=dict(steps=350, batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=30, beta1=0.9, beta2=0.99,
                         weight_decay=0.01, eval_every=0, log_every=20, eval_examples=256, save_every=50,
                         device="cpu", loss=LossConfig(encoder_loss_weight=0.5)),
))
