"""Built-in recipes of the shipped models: `sudoku`, `sudoku-ar` (its autoregressive baseline) and `tiny-code`.

    letterpress train --recipe sudoku --output runs/sudoku          # -> letterpress/assets/sudoku
    letterpress train --recipe sudoku-ar --output runs/sudoku-ar    # same backbone, next-token loss only
    letterpress train --recipe tiny-code --output runs/tiny-code    # -> letterpress/assets/tiny_code

Registered from recipes.py. The defaults are the settings the shipped models were trained with (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from functools import partial
from pathlib import Path


from ..apps import sudoku as S
from ..embedded import ASSETS
from ..tokenizer import Tokenizer
from .data import TokenizedDataset
from .loss import Example, LossConfig
from .recipe import Recipe, register, small_config

# ---------------------------------------------------------------------------------------------------- Sudoku
SUDOKU_DIR = ASSETS / "sudoku"
SUDOKU_GIVENS = (50, 60)  # filled cells per puzzle, inclusive: 21-31 blanks (easy puzzles: a CPU budget)
SUDOKU_TRAIN_SEED = 1_000  # base puzzles of the training stream: seed SUDOKU_TRAIN_SEED + recipe seed
# Harder training puzzles than the held-out ones (more blanks: longer chains of deduction), the recipe
# `sudoku-harder` for continuing a trained model; the held-out and validation puzzles stay at SUDOKU_GIVENS.
SUDOKU_HARDER_GIVENS = (45, 60)
# (--seed, givens) of every training stream behind the figures in BENCHMARKS.md, "Sudoku": the shipped model's
# three runs (sudoku seed 0, sudoku seed 1, sudoku-harder seed 5) and the comparison run (sudoku seed 3)
SUDOKU_STREAMS = ((0, SUDOKU_GIVENS), (1, SUDOKU_GIVENS), (3, SUDOKU_GIVENS), (5, SUDOKU_HARDER_GIVENS))
# `sudoku-hard`: puzzles at the difficulty people play (22-40 givens; uniqueness stops most removals at 23-26),
# for continuing the shipped model; fewer base puzzles (they take ~0.2 s each to make), the same stream length
SUDOKU_HARD_GIVENS = (22, 40)
SUDOKU_HARD_BASE_PUZZLES = 500
SUDOKU_HARD_SEED = 6  # --seed of the sudoku-hard run behind BENCHMARKS.md (training seed SUDOKU_TRAIN_SEED + 6)
SUDOKU_BUCKET_SEED = 888_000  # held-out puzzles with exactly g givens: seed SUDOKU_BUCKET_SEED + g (per bucket)
SUDOKU_HELD_OUT_SEED = 777_777  # the 1,000 held-out puzzles (benchmarks/sudoku.py, tests)
SUDOKU_VALIDATION_SEED = 555_555  # puzzles for tuning the sampler, so the held-out ones stay untouched
SUDOKU_BASE_PUZZLES = 4_000  # generated puzzles; `augment` turns them into the training stream
SUDOKU_STREAM = 80_000  # augmented training examples (the run visits each at most once at the default steps)
SUDOKU_CANVAS = 84  # 81 cells + EOS, the rest EOS fill


def build_sudoku_tokenizer(out_dir: Path = SUDOKU_DIR) -> Path:
    """A word-level tokenizer: ids 0..6 the special tokens of bpe.SPECIAL_TOKENS, then the digits 0-9 (7..16),
    then the 810 cell words of `sudoku.prompt_text` ("aa0" .. "ii9": row, column, content). The prompt is the
    puzzle's 81 cell words; the canvas holds the solution, one digit token per cell; decoding concatenates
    (81 cells <-> 81 characters)."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    from .bpe import SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({str(d): len(SPECIAL_TOKENS) + d for d in range(10)})
    for r in S.CELL_LETTERS:
        for c in S.CELL_LETTERS:
            for d in range(10):
                vocab[f"{r}{c}{d}"] = len(vocab)
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex("[a-i][a-i][0-9]|[0-9]"), behavior="isolated")])
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


SUDOKU_VOCAB = 7 + 10 + 810


def sudoku_config(vocab_size: int = SUDOKU_VOCAB) -> dict:
    """2.3M parameters: hidden 128, 6 layers (sliding, sliding, full) x 2, 4 experts top-2, canvas 84, vocabulary 827."""
    return small_config(vocab_size=vocab_size, canvas_length=SUDOKU_CANVAS, hidden_size=128, head_dim=32,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                        sliding_window=256, max_position_embeddings=512, eos_token_id=(1,))


def sudoku_example(puzzle: str, solution: str, tokenizer: Tokenizer) -> Example:
    """prompt = <bos> + the 81 cell words of `sudoku.prompt_text`; target = the 81 digits of the solution."""
    return Example(prompt=tokenizer.encode(S.prompt_text(puzzle), add_special_tokens=True),
                   target=tokenizer.encode(solution))


def held_out_puzzles(n: int = 1000) -> list[tuple[str, str]]:
    """The held-out (puzzle, solution) pairs: their own seed, never in a training stream (checked by
    `check_disjoint`)."""
    return S.generate(n, SUDOKU_GIVENS, SUDOKU_HELD_OUT_SEED)


def validation_puzzles(n: int = 200) -> list[tuple[str, str]]:
    """Puzzles for choosing sampler settings (benchmarks/sudoku.py --validation): neither trained on nor
    held out."""
    return S.generate(n, SUDOKU_GIVENS, SUDOKU_VALIDATION_SEED)


def bucket_puzzles(givens: int, n: int) -> list[tuple[str, str]]:
    """Held-out (puzzle, solution) pairs with exactly `givens` givens (benchmarks/sudoku.py --buckets): their own
    seed per bucket, so a bucket's first n are the same whatever n."""
    return S.generate_exact(n, givens, SUDOKU_BUCKET_SEED + givens)


def sudoku_training_pairs(seed: int, n_base: int = SUDOKU_BASE_PUZZLES, n_stream: int = SUDOKU_STREAM,
                          givens: tuple[int, int] = SUDOKU_GIVENS) -> list[tuple[str, str]]:
    base = S.generate(n_base, givens, SUDOKU_TRAIN_SEED + seed)
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


def sudoku_data(tokenizer: Tokenizer, seed: int,
                givens: tuple[int, int] = SUDOKU_GIVENS) -> tuple[TokenizedDataset, TokenizedDataset]:
    train = sudoku_training_pairs(seed, givens=givens)
    held_out = held_out_puzzles()
    check_disjoint(train, held_out)
    return (TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in train),
            TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in held_out[:256]))


def sudoku_hard_data(tokenizer: Tokenizer, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    """`sudoku-hard`: 500 base puzzles with 22-40 givens, augmented to the usual 80,000-example stream; the
    held-out loss is measured on the first 256 of the 32-givens bucket."""
    train = sudoku_training_pairs(seed, n_base=SUDOKU_HARD_BASE_PUZZLES, givens=SUDOKU_HARD_GIVENS)
    held_out = bucket_puzzles(32, 256)
    check_disjoint(train, held_out)
    return (TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in train),
            TokenizedDataset(sudoku_example(p, s, tokenizer) for p, s in held_out))


def sudoku_hard_solve_rate(givens: int = 32, n: int = 50):
    """An eval hook for `sudoku-hard`: the plain sampler's solve rate (no rule mask) on the first `n` held-out
    puzzles with `givens` givens."""
    def evaluate(trainer) -> dict[str, float]:
        import tempfile

        from ..apps.sudoku_solve import solve_diffusion

        state = trainer.full_state()
        if not trainer.env.is_main:
            return {}
        puzzles = [p for p, _ in bucket_puzzles(givens, n)]
        with tempfile.TemporaryDirectory() as tmp:
            r = solve_diffusion(trainer.save_model(state, Path(tmp) / "model"), puzzles, batch=n)
        return {f"solve_rate_{givens}": r["solve_rate"]}
    return evaluate


def sudoku_solve_rate(kind: str, n: int = 100):
    """An eval hook: the solve rate on the first `n` held-out puzzles (greedy) of the model being trained."""
    def evaluate(trainer) -> dict[str, float]:
        import tempfile

        from ..apps.sudoku_solve import solve_autoregressive, solve_diffusion

        state = trainer.full_state()  # collective: every rank takes part
        if not trainer.env.is_main:
            return {}
        puzzles = [p for p, _ in held_out_puzzles(n)]
        with tempfile.TemporaryDirectory() as tmp:
            folder = trainer.save_model(state, Path(tmp) / "model")
            r = solve_diffusion(folder, puzzles) if kind == "diffusion" else solve_autoregressive(folder, puzzles)
        return {"solve_rate": r["solve_rate"], **({"tokens_per_forward": r["tokens_per_forward"]}
                                                   if kind == "diffusion" else {})}
    return evaluate


SUDOKU_HYPERPARAMETERS = dict(steps=4000, batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9,
                              beta2=0.99, weight_decay=0.01, eval_every=500, log_every=50, eval_examples=256,
                              save_every=250, tokenizer=str(SUDOKU_DIR), device="cpu")
# The diffusion model spends its compute on the diffusion loss alone; the baseline on the next-token loss alone
# (no decoder passes). Per example, in token-passes (forward + backward = 3, forward only = 1): the diffusion
# model's encoder over the 82-token prompt (3 x 82) plus two decoder passes over the 84-token canvas, the
# self-conditioning one without gradient (3 x 84 + 84) = 582; the baseline's encoder over the 163-token prompt +
# solution (3 x 163) = 489. Same training compute: 4,000 x 582 / 489 = 4,760 baseline steps.
SUDOKU_RECIPE = register(Recipe(
    name="sudoku",
    description=f"Sudoku case study, from scratch: a 6-layer DiffusionGemma (hidden 128, canvas {SUDOKU_CANVAS}) on "
                f"generated puzzles with {SUDOKU_GIVENS[0]}-{SUDOKU_GIVENS[1]} givens, augmented; diffusion loss only",
    build_data=sudoku_data,
    model_config=sudoku_config(),
    hyperparameters={**SUDOKU_HYPERPARAMETERS, "loss": LossConfig(encoder_loss_weight=0.0)},
    evaluate=sudoku_solve_rate("diffusion"),
))

register(replace(
    SUDOKU_RECIPE, name="sudoku-harder",
    description=f"the sudoku recipe on puzzles with {SUDOKU_HARDER_GIVENS[0]}-{SUDOKU_HARDER_GIVENS[1]} givens "
                "(evaluated on the same held-out puzzles)",
    build_data=partial(sudoku_data, givens=SUDOKU_HARDER_GIVENS),
))

register(replace(
    SUDOKU_RECIPE, name="sudoku-hard",
    description=f"continue a Sudoku model on puzzles at the difficulty people play ({SUDOKU_HARD_GIVENS[0]}-"
                f"{SUDOKU_HARD_GIVENS[1]} givens, {SUDOKU_HARD_BASE_PUZZLES:,} base puzzles augmented); evaluated "
                "on the 32-givens held-out bucket",
    build_data=sudoku_hard_data,
    hyperparameters={**SUDOKU_HYPERPARAMETERS, "eval_every": 1000, "loss": LossConfig(encoder_loss_weight=0.0)},
    evaluate=sudoku_hard_solve_rate(),
))

register(replace(
    SUDOKU_RECIPE, name="sudoku-ar",
    description="the Sudoku case study's autoregressive baseline: the same backbone, data and steps, trained "
                "causally by the encoder's next-token loss alone (diffusion loss weight 0)",
    # 4,760 steps: the same training compute as the diffusion model's 4,000 (see above)
    hyperparameters={**SUDOKU_HYPERPARAMETERS, "steps": 4760,
                     "loss": LossConfig(encoder_loss_weight=1.0, diffusion_loss_weight=0.0, self_conditioning_prob=0.0)},
    evaluate=sudoku_solve_rate("autoregressive"),
))


# ------------------------------------------------------------------------------------------------- tiny-code
TINY_CODE_DIR = ASSETS / "tiny_code"
TINY_CODE_HELD_OUT = ("json", "email", "http")  # kept out of training (and of the tokenizer's corpus)
TINY_CODE_CANVAS = 64


def tiny_code_config(vocab_size: int = 4096) -> dict:
    """A DiffusionGemma of the released shape family, small: hidden 192, 4 layers (3 sliding, 1 full),
    4 experts top-2, canvas 64."""
    return small_config(vocab_size=vocab_size, canvas_length=TINY_CODE_CANVAS, hidden_size=192, head_dim=48,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=128,
                        max_position_embeddings=4096)


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


def tiny_code_files() -> tuple[list[Path], list[Path]]:
    """The standard library files the tiny-code recipe trains on, and those of the held-out packages (json,
    email, http), which it never trains on: one walk of the standard library, split by top-level name."""
    from .bpe import stdlib_module, stdlib_python_files

    train, held = [], []
    for path in stdlib_python_files():
        (held if stdlib_module(path) in TINY_CODE_HELD_OUT else train).append(path)
    return train, held


def tiny_code_held_out_files() -> list[Path]:
    return tiny_code_files()[1]


def tiny_code_data(tokenizer: Tokenizer, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    files, held = tiny_code_files()  # held: the held-out loss
    train = code_windows(tokenizer, seed, 120_000, files)
    held_out = code_windows(tokenizer, seed + 1, 512, held) if held else None
    return train, held_out


register(Recipe(
    name="tiny-code",
    description="the embedded default model: a 4-layer DiffusionGemma (hidden 192) trained from scratch on the "
                "Python standard library (json, email and http held out) with the embedded BPE tokenizer",
    build_data=tiny_code_data,
    model_config=tiny_code_config(),
    tokenizer=str(TINY_CODE_DIR),
    # This recipe's run was started with steps=4000 and, at step 2,000, resumed with --steps 3500 to fit the CPU
    # budget (the cosine then steps down from 1.09e-3 to 0.83e-3); this recipe's single 3,500-step schedule
    # differs from it only in the learning rate of those first 2,000 steps. The shipped weights continue it for
    # 4,000 steps (--model runs/tiny-code/model --train-router --seed 1 --steps 4000 --lr 1e-3 --min-lr 3e-5;
    # BENCHMARKS.md, "Embedded models").
    hyperparameters=dict(steps=3500, batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
                         weight_decay=0.01, eval_every=1000, log_every=50, eval_examples=256, save_every=250,
                         device="cpu", loss=LossConfig(encoder_loss_weight=0.5)),
))
