"""The recipe of the embedded default model, `tiny-tasks`: short reformatting jobs, tool calls and tool answers
(letterpress.train.tasks) in the Gemma 4 chat format, trained from scratch.

    letterpress train --recipe tiny-tasks --output runs/tiny-tasks
    python -m letterpress.train.recipes_tasks ship runs/tiny-tasks/model    # -> letterpress/assets/tiny_tasks

The tokenizer (`build_tasks_tokenizer`) is a byte-level BPE trained on the generated conversations, with the
Gemma 4 control tokens (<|turn>, <turn|>, <|tool_call>, ...) as single special ids, digits split one per
token (arithmetic and unit shifts work digit by digit), and every space its own token: a word is the same
id wherever it stands (`city=Oslo`, `in Oslo`, `"Oslo"`), so an answer copies a value from the prompt by
finding that id, not by mapping `ĠOslo` to `Oslo`. At 2,048 ids every word of the task pools is one token.
Registered from recipes.py.
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import json
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..embedded import ASSETS, TOKENIZER_FILES
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from . import tasks as T
from .data import TokenizedDataset
from .loss import Example, LossConfig
from .recipe import RECIPES, Recipe, register, small_config

TASKS_DIR = ASSETS / "tiny_tasks"
TEMPLATE = Path(__file__).resolve().parent.parent / "chat_templates" / "gemma4_tools.jinja"
CONTROL_TOKENS = ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
                  "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>')
TASKS_CANVAS = 40  # every answer (at most 36 tokens with its end marker) fits one canvas
TASKS_VOCAB = 2048
PLAIN_SHARE = 0.15  # share of single-turn examples given as a plain prompt (`letterpress generate` without a template)
TASKS_STREAM = 80_000
SHIP_FORMAT = "int8"  # how the default ships: assets/ holds every embedded model within 25 MB (issue 16)
EMBEDDING = "model.decoder.embed_tokens.weight"


def _renderer() -> Tokenizer:
    """A tokenizer object that only renders the chat template (its backend is never used for that)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    return Tokenizer(HFTokenizer(models.BPE()), {"bos_token": "<bos>"}, {"default": TEMPLATE.read_text("utf-8")})


def render(task: T.Task, renderer: Tokenizer) -> tuple[str, str]:
    """(prompt text through the generation prompt, target text including its end marker)."""
    prompt = renderer.apply_chat_template(task.messages, add_generation_prompt=True, tools=task.tools)
    thought = f"<|channel>thought\n{task.thought}<channel|>" if task.thought else ""
    return prompt, task.answer if task.kind == "tool_call" else thought + task.answer + "<turn|>"


def build_tasks_tokenizer(out_dir: Path = TASKS_DIR, vocab_size: int = TASKS_VOCAB, n: int = 20_000) -> Path:
    """Train the BPE on `n` rendered training conversations (seed TRAIN_SEED - 1, not a training stream's) and
    write tokenizer.json, tokenizer_config.json and the Gemma-4-style chat_template.jinja to `out_dir`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    from .bpe import SPECIAL_TOKENS, _tokenizer_config

    renderer = _renderer()
    texts = []
    for task in T.make_tasks(n, T.TRAIN_SEED - 1):
        prompt, target = render(task, renderer)
        texts.append(prompt + target)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    # digits one per token; then words, runs of punctuation and single whitespace characters apart (no
    # space-prefixed word tokens); ByteLevel only maps bytes to its alphabet
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(r"\s|[A-Za-z]+|[^\sA-Za-z0-9]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS) + list(CONTROL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {**_tokenizer_config(), "model_max_length": 1024}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(TEMPLATE, out_dir / "chat_template.jinja")
    return out_dir


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS, end of turn, and the tool-response marker a call stops at (the released model's stop ids)."""
    return [tokenizer.eos_id, tokenizer.token_to_id("<turn|>"), tokenizer.token_to_id("<|tool_response>")]


def task_examples(tasks: list[T.Task], tokenizer: Tokenizer, plain_share: float = 0.0) -> list[Example]:
    """Chat examples (prompt = rendered conversation, target = answer + end marker); every 1/plain_share-th
    single-turn text task instead as a plain prompt (<bos> + the request) -> answer (+ EOS from the loss)."""
    renderer = tokenizer
    prompts, targets = [], []
    every = round(1 / plain_share) if plain_share else 0
    for i, task in enumerate(tasks):
        if every and i % every == 0 and task.tools is None and len(task.messages) == 1:
            prompts.append("<bos>" + task.messages[0]["content"])
            targets.append(task.answer)
        else:
            p, t = render(task, renderer)
            prompts.append(p)
            targets.append(t)
    backend = tokenizer._backend
    p_ids = backend.encode_batch(prompts, add_special_tokens=False)
    t_ids = backend.encode_batch(targets, add_special_tokens=False)
    return [Example(prompt=p.ids, target=t.ids) for p, t in zip(p_ids, t_ids)]


# The `tiny-tasks-focus` stage's mix: the families furthest from the goal drawn most (sort_dedup, units and
# arithmetic were at 0-27% exact after 11,450 uniform steps), the tool families least: they were at 93-100%, and
# their 130-220-token prompts (the declared tools) cost 4-5x a short family's per example.
FOCUS_WEIGHTS = {"sort_dedup": 3.0, "arithmetic": 3.0, "units": 3.0, "case": 2.0, "csv_to_json": 2.0, "date": 2.0,
                 "extract": 2.0, "json_to_yaml": 1.5, "kv_to_json": 1.0, "tool_call": 0.5, "tool_answer": 0.75}


# The `tiny-tasks-open` stage's share of OPEN-valued tasks: the shipped model answered "name=Ada, year=1815" with
# {"name": "name", "year": 1015}: held-out tasks drawn from the training pools had hidden that it recalls pool
# values instead of copying.
OPEN_STAGE_SHARE = 0.5


# The `tiny-tasks-short` stage's mix: after the focus stage arithmetic (6.7%) and sort_dedup (20%) were the two
# families far from the goal. Their answers are short (arithmetic 2-4 tokens against 10-25 for most families), and
# the loss is a mean over answer tokens, so at the focus weights they had ~3% of the loss tokens; here they
# get most of the examples, the families already at 90-100% enough to hold their place.
SHORT_WEIGHTS = {"arithmetic": 10.0, "sort_dedup": 6.0, "units": 2.0, "case": 1.0, "date": 1.0, "csv_to_json": 1.0,
                 "extract": 1.0, "json_to_yaml": 1.0, "kv_to_json": 0.75, "tool_call": 0.3, "tool_answer": 0.4}


def training_tasks(seed: int, n: int = TASKS_STREAM, weights: dict[str, float] | None = None) -> list[T.Task]:
    return T.make_tasks(n, T.TRAIN_SEED + seed, weights=weights)


# Families whose tasks draw names, words, keys or numbers from `tasks.Values` (arithmetic and units do not): the
# ones an OPEN-valued stream teaches to copy.
OPEN_FAMILIES = tuple(f for f in T.FAMILIES if f not in ("arithmetic", "units"))
OPEN_SEED = 500  # an OPEN-valued stream's seed: TRAIN_SEED + OPEN_SEED + recipe seed


def open_training_tasks(seed: int, n: int, weights: dict[str, float] | None = None,
                        values: T.Values = T.OPEN) -> list[T.Task]:
    """`n` tasks with OPEN-like `values` (made-up names, cities, items and keys, wide number ranges) of
    OPEN_FAMILIES."""
    w = {f: (weights or {}).get(f, 1.0) for f in OPEN_FAMILIES}
    return T.make_tasks(n, T.TRAIN_SEED + OPEN_SEED + seed, weights=w, values=values)


@functools.cache
def tokenizer_pieces() -> tuple[str, ...]:
    """The shipped tokenizer's lowercase pieces of letters, at most 6 long (652 of them): what PIECES words join.
    The syllables of OPEN words split into a few dozen tokens; a real word the user types ("London") splits
    into pieces no syllable word ever did, and the model mangled it."""
    vocab = json.loads((TASKS_DIR / "tokenizer.json").read_text("utf-8"))["model"]["vocab"]
    return tuple(sorted(t for t in vocab if t.isascii() and t.isalpha() and t.islower() and len(t) <= 6))


def pieces_word(rng: random.Random, low: int = 1, high: int = 3) -> str:
    """A made-up word of `low`-`high` tokenizer pieces ("rosaom", "childloana", "ty")."""
    return "".join(rng.choice(tokenizer_pieces()) for _ in range(rng.randint(low, high)))


PIECES = T.Values(open=True, make_word=pieces_word)


@functools.cache
def training_prompts(n: int = TASKS_STREAM) -> frozenset[str]:
    """The prompts of every recipe's seed-0 stream (every run so far): what a held-out example must not be.
    Cached: it draws 280,000 tasks."""
    pooled = (t for w in (None, FOCUS_WEIGHTS, SHORT_WEIGHTS) for t in training_tasks(0, n, weights=w))
    opened = open_training_tasks(0, round(n * OPEN_STAGE_SHARE), FOCUS_WEIGHTS)
    return frozenset([t.prompt_key for t in pooled] + [t.prompt_key for t in opened])


TIMES_SEED = 700  # a stage's extra times-table stream: TRAIN_SEED + TIMES_SEED + stream + recipe seed


def tasks_data(tokenizer: Tokenizer, seed: int, weights: dict[str, float] | None = None,
               open_share: float = 0.0, open_values: tuple[T.Values, ...] = (T.OPEN,), stream: int = 0,
               avoid: Callable[[], frozenset[str]] | None = None,
               times_share: float = 0.0) -> tuple[TokenizedDataset, TokenizedDataset]:
    """The training stream (TASKS_STREAM tasks, `open_share` of them with OPEN-like values, split evenly over
    `open_values`, and `times_share` extra products of the times table (`tasks.times_table`), shuffled together;
    the seeds offset by `stream`; none whose prompt is in `avoid()`) and the eval set: 24 held-out tasks per
    family, and as many OPEN-valued ones per open family when `open_share`."""
    n_open, n_times = round(TASKS_STREAM * open_share), round(TASKS_STREAM * times_share)
    train = training_tasks(stream + seed, TASKS_STREAM - n_open - n_times, weights=weights)
    for i, values in enumerate(open_values if n_open else ()):
        train += open_training_tasks(stream + seed + 100 * i, n_open // len(open_values), weights, values)
    rng = random.Random(T.TRAIN_SEED + TIMES_SEED + stream + seed)
    train += [T.times_table(rng) for _ in range(n_times)]
    if n_open or n_times:
        random.Random(seed).shuffle(train)
    if avoid is not None:
        avoided = avoid()
        train = [t for t in train if t.prompt_key not in avoided]
    seen = {t.prompt_key for t in train}
    held = [t for f in T.FAMILIES for t in T.held_out_tasks(f, 24, exclude=seen)]
    if n_open:
        held += [t for f in OPEN_FAMILIES for t in T.held_out_tasks(f, 24, exclude=seen, values=T.OPEN)]
    examples = [e for e in task_examples(train, tokenizer, PLAIN_SHARE) if len(e.target) < TASKS_CANVAS]
    return TokenizedDataset(examples), TokenizedDataset(task_examples(held, tokenizer))


BENCHMARK_EXAMPLES = 200  # per family and kind of values: more than default_model.py or a probe scores


@functools.cache
def benchmark_prompts(n: int = BENCHMARK_EXAMPLES) -> frozenset[str]:
    """The prompts `benchmarks/default_model.py` can score: the first `n` held-out examples of every family (in
    both phrasings, with POOLED, OPEN, PIECES and REAL values) and of the validation seed. A stage whose stream
    is not among `training_prompts` leaves these out of its stream, so that the held-out sets stay as they are."""
    seen = training_prompts()
    keys = set()
    for family in T.FAMILIES:
        kinds = (T.POOLED, T.OPEN, PIECES, T.REAL) if family in OPEN_FAMILIES else (T.POOLED,)
        for values in kinds:
            for phrasing in ("train", "held_out"):
                keys.update(t.prompt_key for t in T.held_out_tasks(family, n, phrasing, exclude=seen, values=values))
            keys.update(t.prompt_key for t in T.held_out_tasks(family, n, exclude=seen, seed=T.VALIDATION_SEED,
                                                               values=values))
    return frozenset(keys)


def judge(task: T.Task, raw: str) -> bool:
    """Whether a decoded output (special tokens kept, stop token excluded) is exactly the task's answer: a text
    answer equal to the expected text (the content `chat_output.parse_output` gives); a tool call as exactly one
    call of the expected name whose JSON arguments equal the expected ones (what the agent API returns)."""
    from ..chat_output import parse_output

    out = parse_output(raw, tool_calls=task.tools is not None)
    if task.kind == "tool_call":
        if len(out.tool_calls) != 1 or out.content.strip():
            return False
        call = out.tool_calls[0]
        return call.name == task.call["name"] and json.loads(call.arguments) == task.call["arguments"]
    return not out.tool_calls and out.content == task.answer


def exact_match(folder: str | Path, tasks: list[T.Task]) -> tuple[list[bool], list]:
    """Greedy chat replies of the checkpoint in `folder` to `tasks` (seed = index): (right per task, outputs)."""
    from ..engine.llm import LLM
    from ..engine.request import SamplingParams

    llm = LLM(str(folder), max_num_seqs=32)
    outs: list = [None] * len(tasks)
    plain = [i for i, t in enumerate(tasks) if t.tools is None]  # one batch; requests with tools one at a time
    for i, out in zip(plain, llm.chat([tasks[i].messages for i in plain], [SamplingParams(seed=i) for i in plain])):
        outs[i] = out
    for i, t in enumerate(tasks):
        if t.tools is not None:
            outs[i] = llm.chat(t.messages, SamplingParams(seed=i), tools=t.tools)[0]
    raws = [llm.tokenizer.decode(o.token_ids, skip_special_tokens=False) for o in outs]
    return [judge(t, r) for t, r in zip(tasks, raws)], outs


def exact_match_of_trainer(trainer, tasks: list[T.Task]) -> tuple[list[bool], list] | None:
    """`exact_match` of the trainer's current weights, saved to a temporary folder; None on a rank other than the
    main one. Collective: every rank must call it (gathering the full state)."""
    state = trainer.full_state()
    if not trainer.env.is_main:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return exact_match(trainer.save_model(state, Path(tmp) / "model"), tasks)


def exact_match_hook(n: int = 4, open_values: bool = False):
    """An eval hook: exact match per family on `n` validation examples each (not the held-out ones); with
    `open_values`, also the mean over `n` OPEN-valued ones per open family (`exact_open_mean`)."""
    def evaluate(trainer) -> dict[str, float]:
        import statistics

        tasks = [t for f in T.FAMILIES for t in T.held_out_tasks(f, n, seed=T.VALIDATION_SEED)]
        opened = ([t for f in OPEN_FAMILIES for t in T.held_out_tasks(f, n, seed=T.VALIDATION_SEED, values=T.OPEN)]
                  if open_values else [])
        scored = exact_match_of_trainer(trainer, tasks + opened)
        if scored is None:
            return {}
        right, outs = scored
        right, right_open, outs = right[:len(tasks)], right[len(tasks):], outs[:len(tasks)]
        by_family = {f: statistics.mean(r for r, t in zip(right, tasks) if t.family == f) for f in T.FAMILIES}
        return {"exact_mean": statistics.mean(right), "exact_min": min(by_family.values()),
                "tokens_per_forward": statistics.mean(o.tokens_per_forward for o in outs),
                **({"exact_open_mean": statistics.mean(right_open)} if right_open else {}),
                **{f"exact_{f}": v for f, v in by_family.items()}}
    return evaluate


def tasks_config(vocab_size: int = TASKS_VOCAB, eos: tuple[int, ...] = (1, 8, 16), hidden_size: int = 128,
                 blocks: int = 2, canvas_length: int = TASKS_CANVAS) -> dict:
    """hidden 128, 6 layers (sliding, sliding, full) x 2, 4 experts top-2, canvas 40. `hidden_size` (4 heads
    of a quarter of it) and `blocks` (of three layers) change only the capacity probes' shapes, `canvas_length`
    only the compute probes' (no weight depends on it)."""
    return small_config(vocab_size=vocab_size, canvas_length=canvas_length, hidden_size=hidden_size,
                        head_dim=hidden_size // 4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * blocks,
                        sliding_window=256, max_position_embeddings=1024, eos_token_id=eos)


register(Recipe(
    name="tiny-tasks",
    description="the embedded default model: a 6-layer DiffusionGemma (hidden 128, canvas 40) trained from scratch "
                "on generated reformatting tasks, tool calls and tool answers in the Gemma 4 chat format",
    build_data=tasks_data,
    model_config=tasks_config(),
    evaluate=exact_match_hook(),
    tokenizer=str(TASKS_DIR),
    # The second run (BENCHMARKS.md, "tiny-tasks") used this recipe with --steps 1000, resumed at step 500 with
    # --steps 750 when the shared CPU proved too slow; the third continued from its weights (--model, --train-router,
    # --lr 2e-3, 5,000 steps; the commands are in BENCHMARKS.md) and reached 38% exact: copying starts after ~2,500
    # steps in all, and 2,000 steps from scratch is still far below what the goals need.
    hyperparameters=dict(steps=2000, batch_size=16, micro_batch_size=4, lr=3e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
                         weight_decay=0.01, eval_every=500, log_every=50, eval_examples=264, save_every=250,
                         device="cpu", loss=LossConfig(encoder_loss_weight=0.0)),
))


def register_stage(name: str, description: str, weights: dict[str, float], open_share: float = 0.0,
                   open_values: tuple[T.Values, ...] = (T.OPEN,), stream: int = 0, times_share: float = 0.0) -> None:
    """A later tiny-tasks stage: the same model, tasks and hook, drawn in proportion to `weights` (`open_share`
    of them with `open_values`), at a lower learning rate; start it from an earlier stage's model (--model). A
    stage with its own `stream` (seeds offset) leaves the benchmark's examples out of it."""
    register(Recipe(
        name=name,
        description=description,
        build_data=lambda tokenizer, seed: tasks_data(tokenizer, seed, weights, open_share, open_values, stream,
                                                      benchmark_prompts if stream else None, times_share),
        model_config=tasks_config(),
        evaluate=exact_match_hook(open_values=open_share > 0),
        tokenizer=str(TASKS_DIR),
        hyperparameters={**RECIPES["tiny-tasks"].hyperparameters, "lr": 1e-3, "warmup_steps": 50},
    ))


register_stage("tiny-tasks-focus", "tiny-tasks' second stage: the same model and tasks, drawn in proportion to "
               "FOCUS_WEIGHTS (the weakest families most, the long-prompt tool families least); start it from a "
               "tiny-tasks model (--model)", FOCUS_WEIGHTS)
register_stage("tiny-tasks-short", "tiny-tasks' third stage: the same model and tasks, drawn in proportion to "
               "SHORT_WEIGHTS (arithmetic and sort_dedup most); start it from a focus-stage model (--model)",
               SHORT_WEIGHTS)
register_stage("tiny-tasks-open", "tiny-tasks' copying stage: half the tasks with OPEN values (made-up names, "
               "cities, items and keys, wide number ranges), so that the model copies what it is given instead of "
               "recalling the training pools; FOCUS_WEIGHTS; start it from a focus-stage model (--model)",
               FOCUS_WEIGHTS, open_share=OPEN_STAGE_SHARE)
# The second copying stage: fresh streams (COPY_STREAM), so that a continued run sees new tasks, half of the
# made-up words joined from tokenizer pieces (PIECES) in `tiny-tasks-copy`, all of syllables in its control.
COPY_STREAM = 1000
register_stage("tiny-tasks-copy", "tiny-tasks' second copying stage: fresh tasks, half with made-up values, of "
               "which half are words joined from the tokenizer's pieces (PIECES), half of syllables (OPEN); "
               "FOCUS_WEIGHTS; start it from the shipped model (`python -m letterpress.train.recipes_tasks unship "
               "DIR`, then --model DIR)", FOCUS_WEIGHTS, OPEN_STAGE_SHARE, (T.OPEN, PIECES), COPY_STREAM)
# The `tiny-tasks-polish` stage's mix: after `tiny-tasks-copy` the families a few examples short of 95% on 100
# held-out examples (json_to_yaml 84%, units 89%, extract 92%, kv_to_json 94%) drawn most; arithmetic (0%)
# least of the rest, since three times its share taught none (`tiny-tasks-short`).
POLISH_WEIGHTS = {"json_to_yaml": 3.0, "units": 3.0, "extract": 3.0, "kv_to_json": 2.0, "sort_dedup": 2.0,
                  "csv_to_json": 1.5, "case": 1.5, "date": 1.0, "arithmetic": 1.0, "tool_call": 0.5,
                  "tool_answer": 0.75}
register_stage("tiny-tasks-polish", "tiny-tasks' polishing stage: the tiny-tasks-copy stage's streams and values "
               "drawn in proportion to POLISH_WEIGHTS (the families just short of the goal most); start it from "
               "the shipped model (`unship DIR`, then --model DIR)", POLISH_WEIGHTS, OPEN_STAGE_SHARE,
               (T.OPEN, PIECES), COPY_STREAM)
# The `tiny-tasks-times` stage's extra products: the shipped default knows ~22 of the 88 products of the times table
# (a product was one example in ~40 of the copy stage's mix, ~60 per fact), while a fresh model learns 78 of them
# from ~270 examples per fact (`times-direct`); a fifth of the stream as products gives ~200 more per fact in
# 6,000 steps. Sums and differences stay as POLISH_WEIGHTS draws them.
TIMES_SHARE = 0.2
register_stage("tiny-tasks-times", "tiny-tasks-polish with a fifth of the stream products of the times table "
               "(TIMES_SHARE); start it from the shipped model (`unship DIR`, then --model DIR)", POLISH_WEIGHTS,
               OPEN_STAGE_SHARE, (T.OPEN, PIECES), COPY_STREAM, TIMES_SHARE)
# The `tiny-tasks-units` stages: after the polish stage units was the family nearest the goal that missed it
# (88-94% in every candidate; its misses shift the decimal point, `40.8 cm` -> `4080 mm`, or write the unit twice),
# so it is drawn twice as often as POLISH_WEIGHTS draws it; the second stage adds the times stage's products.
UNITS_WEIGHTS = {**POLISH_WEIGHTS, "units": 6.0}
register_stage("tiny-tasks-units", "tiny-tasks-polish with units drawn twice as often (UNITS_WEIGHTS); start it "
               "from the shipped model (`unship DIR`, then --model DIR)", UNITS_WEIGHTS, OPEN_STAGE_SHARE,
               (T.OPEN, PIECES), COPY_STREAM)
register_stage("tiny-tasks-units-times", "tiny-tasks-times with units drawn twice as often (UNITS_WEIGHTS); start "
               "it from the shipped model (`unship DIR`, then --model DIR)", UNITS_WEIGHTS, OPEN_STAGE_SHARE,
               (T.OPEN, PIECES), COPY_STREAM, TIMES_SHARE)
register_stage("tiny-tasks-copy-syllables", "the control of tiny-tasks-copy: the same, every made-up word of "
               "syllables (OPEN)", FOCUS_WEIGHTS, OPEN_STAGE_SHARE, (T.OPEN,), COPY_STREAM)


# The probes (BENCHMARKS.md, "Arithmetic probe", "Sorting probe"): can a fresh model of this size learn one family
# at all, trained on nothing else? One family's tasks only, none of them among the held-out examples
# `benchmarks/default_model.py` scores (its first PROBE_HELD_OUT). The arithmetic probe answers directly or after
# column steps in its thought channel.
PROBE_HELD_OUT = 200
PROBE_HOOK_EXAMPLES = 40


@dataclass(frozen=True)
class Probe:
    family: str
    draw: Callable[[random.Random], T.Task]
    description: str
    # Keep the hook's validation prompts out of the training stream, so that its figure is not memorization.
    # The arithmetic probes ran before this existed (their streams hold ~half the hook's prompts); they keep
    # their streams so that the recorded runs stay reproducible.
    exclude_hook_prompts: bool = True
    hook: bool = True  # score the family's validation prompts at every eval (not for a probe of part of a family)
    model_config: dict = field(default_factory=tasks_config)  # the default's shape unless a probe says otherwise
    stream: int = TASKS_STREAM // 4  # tasks drawn for the training stream (before the held-out ones are dropped)
    hyperparameters: dict = field(default_factory=dict)  # over the tiny-tasks recipe's


PROBES = {
    "arith-direct": Probe("arithmetic", T.arithmetic, "the arithmetic probe: a fresh tiny-tasks model trained on "
                          "arithmetic alone, answering directly", exclude_hook_prompts=False),
    "arith-worked": Probe("arithmetic", T.worked_arithmetic, "the arithmetic probe: a fresh tiny-tasks model trained "
                          "on arithmetic alone, answering after column steps in its thought channel",
                          exclude_hook_prompts=False),
    "times-direct": Probe("arithmetic", T.times_table, "the times-table probe: a fresh tiny-tasks model trained "
                          "on the products of the arithmetic family alone (88 facts)", exclude_hook_prompts=False,
                          hook=False),
    "sort-direct": Probe("sort_dedup", T.sort_dedup, "the sorting probe: a fresh tiny-tasks model trained on "
                         "sort_dedup alone"),
    "arith-aligned": Probe("arithmetic", T.aligned_arithmetic, "the aligned arithmetic probe: a fresh tiny-tasks "
                           "model trained on arithmetic alone, answering after its operands and result zero-padded "
                           "to three digits in its thought channel ('038+057=095')"),
    # The capacity probes (BENCHMARKS.md, "Capacity probe"): arith-aligned's stream and hyperparameters, a model
    # of twice the width (9.4M parameters) or twice the depth (4.6M) of the default's 2.5M.
    "arith-aligned-wide": Probe("arithmetic", T.aligned_arithmetic, "the capacity probe: arith-aligned on a model "
                                "of hidden 256 (6 layers, 9.4M parameters)", model_config=tasks_config(hidden_size=256)),
    "arith-aligned-deep": Probe("arithmetic", T.aligned_arithmetic, "the capacity probe: arith-aligned on a model "
                                "of 12 layers (hidden 128, 4.6M parameters)", model_config=tasks_config(blocks=4)),
    # The compute probe (BENCHMARKS.md, "Compute probe"): does the direct formulation learn with several times
    # the examples? A canvas just long enough for the family's answers (8, not 40) makes an example ~3x cheaper,
    # so a step takes 8x the default's 16 examples, drawn from a stream ten times as long. (Sorting gains nothing
    # this way: its answers need a canvas of 24 and its prompts are longer; 64 examples a step took 4 s.)
    "arith-direct-big": Probe("arithmetic", T.arithmetic, "the compute probe: arith-direct with 128 examples a "
                              "step (canvas 8) from a 200,000-task stream", stream=200_000,
                              model_config=tasks_config(canvas_length=8),
                              hyperparameters=dict(batch_size=128, micro_batch_size=128)),
    # The GPU probe of sorting (benchmarks/gpu_tiny_tasks.py): sort-direct with 512 examples a step from a stream
    # 7.5 times as long, what one GPU gives in minutes and this CPU does not in a session (a step of 64 at canvas
    # 40 took 4 s here).
    "sort-direct-big": Probe("sort_dedup", T.sort_dedup, "the GPU sorting probe: sort-direct with 512 examples a "
                             "step from a 150,000-task stream", stream=150_000,
                             hyperparameters=dict(batch_size=512, micro_batch_size=512)),
    "sort-padded": Probe("sort_dedup", T.padded_sort_dedup, "the padded sorting probe: a fresh tiny-tasks model "
                         "trained on sort_dedup alone, a list of numbers answered after its unique values "
                         "in prompt order, zero-padded, in its thought channel ('47 05 23')"),
}


def hook_tasks(family: str, n: int = PROBE_HOOK_EXAMPLES) -> list[T.Task]:
    """The probe hook's validation prompts (VALIDATION_SEED; not the held-out ones)."""
    return T.held_out_tasks(family, n, seed=T.VALIDATION_SEED)


def probe_data(tokenizer: Tokenizer, seed: int, probe: Probe) -> tuple[TokenizedDataset, TokenizedDataset]:
    held = T.held_out_tasks(probe.family, PROBE_HELD_OUT, exclude=training_prompts())
    held_keys = {t.prompt_key for t in held}
    if probe.exclude_hook_prompts:
        held_keys |= {t.prompt_key for t in hook_tasks(probe.family)}
    rng = random.Random(T.TRAIN_SEED + 100 + seed)
    train = [t for t in (probe.draw(rng) for _ in range(probe.stream)) if t.prompt_key not in held_keys]
    valid = [probe.draw(random.Random(i)) for i in range(64)]
    return (TokenizedDataset(task_examples(train, tokenizer, PLAIN_SHARE)),
            TokenizedDataset(task_examples([v for v in valid if v.prompt_key not in held_keys], tokenizer)))


def family_exact_hook(family: str, n: int = PROBE_HOOK_EXAMPLES):
    """Exact match on `n` validation prompts of one family (`hook_tasks`)."""
    def evaluate(trainer) -> dict[str, float]:
        import statistics

        scored = exact_match_of_trainer(trainer, hook_tasks(family, n))
        return {} if scored is None else {f"exact_{family}": statistics.mean(scored[0])}
    return evaluate


for _name, _probe in PROBES.items():
    register(Recipe(
        name=_name,
        description=_probe.description,
        build_data=lambda tokenizer, seed, _p=_probe: probe_data(tokenizer, seed, _p),
        model_config=_probe.model_config,
        evaluate=family_exact_hook(_probe.family) if _probe.hook else None,
        tokenizer=str(TASKS_DIR),
        hyperparameters={**RECIPES["tiny-tasks"].hyperparameters, "eval_examples": 64, **_probe.hyperparameters},
    ))


# The shipped model's sampler defaults (generation_config.json), chosen on 60 validation examples per family
# (`benchmarks/default_model.py --validation`; BENCHMARKS.md, "tiny-tasks", "Decoding"): stop a canvas as soon
# as its mean entropy is below 0.02, without the released sampler's second, confirming pass (stability 1,
# confidence 0.005). Same exact match (76.2% against 76.4%), 7.8 tokens per forward instead of 5.2: a short
# answer the model is sure of takes one pass, not two.
TASKS_DECODING: dict = {"stability_threshold": 0, "confidence_threshold": 0.02}


def ship(model_dir: str | Path, out_dir: str | Path = TASKS_DIR, fmt: str = SHIP_FORMAT,
         embedding_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a trained float tiny-tasks model (a run's `model` folder) into `out_dir` (assets/tiny_tasks) as the
    shipped default: `letterpress quantize`'s weight-only `fmt` checkpoint (compressed-tensors; the linear
    layers and experts quantized, routers and norms as stored), with the embedding, the one large tensor left
    in float, stored as `embedding_dtype` (the engine casts it back to its own dtype on load), plus config.json
    and the model's generation_config.json with the recipe's sampler defaults (TASKS_DECODING) on top. The
    tokenizer files in `out_dir` stay: they must be the ones the model was trained with (a folder without them
    gets the model's)."""
    from safetensors.torch import load_file, save_file

    from ..checkpoint import SINGLE_FILE
    from ..quant_save import quantize_checkpoint

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (model_dir / name).is_file():
            raise CheckpointError(f"{model_dir}: no {name}; ship a model folder a tiny-tasks run wrote")
        if (out_dir / name).is_file() and not filecmp.cmp(model_dir / name, out_dir / name, shallow=False):
            raise CheckpointError(f"{model_dir / name} differs from {out_dir / name}: the model was trained with "
                                  "another tokenizer than the one shipped; ship into an empty folder or replace both")
    with tempfile.TemporaryDirectory() as tmp:
        quantized = quantize_checkpoint(model_dir, Path(tmp) / "model", fmt)
        state = load_file(str(quantized / SINGLE_FILE))
        state[EMBEDDING] = state[EMBEDDING].to(embedding_dtype)
        save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        (out_dir / SINGLE_FILE).chmod(0o644)  # safetensors writes 0600; the package's files are world-readable
        shutil.copyfile(quantized / "config.json", out_dir / "config.json")
    generation = json.loads((model_dir / "generation_config.json").read_text("utf-8"))
    (out_dir / "generation_config.json").write_text(json.dumps({**generation, **TASKS_DECODING}, indent=2) + "\n",
                                                    encoding="utf-8")
    for name in TOKENIZER_FILES:
        if not (out_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    return out_dir


def unship(out_dir: str | Path, src: str | Path = TASKS_DIR) -> Path:
    """The shipped default (`src`) as a float32 model folder to train further from (--model): its int8 weights
    dequantized, which is what the engine computes with, the embedding cast back from bfloat16, the
    quantization_config dropped. A later stage can start from what ships, not only from a run's own folder."""
    from ..checkpoint import save_model
    from ..model.diffusion_gemma import DiffusionGemma
    from ..quant import dequantize_model

    src = Path(src)
    model = dequantize_model(DiffusionGemma.from_pretrained(src, dtype=torch.float32))
    config = json.loads((src / "config.json").read_text("utf-8"))
    config.pop("quantization_config", None)
    generation = json.loads((src / "generation_config.json").read_text("utf-8"))
    return save_model(model, out_dir, config, generation, {n: src / n for n in TOKENIZER_FILES})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m letterpress.train.recipes_tasks",
                                 description="tiny-tasks, the embedded default model: ship a trained one")
    commands = ap.add_subparsers(dest="command", required=True)
    sh = commands.add_parser("ship", help="write a trained model folder into letterpress/assets/tiny_tasks")
    sh.add_argument("model", help="the float model folder a run wrote (RUN/model)")
    sh.add_argument("--out", default=str(TASKS_DIR))
    sh.add_argument("--format", default=SHIP_FORMAT, choices=("int8", "int4"))
    un = commands.add_parser("unship", help="write the shipped default as a float32 model folder to train from")
    un.add_argument("out", help="the folder to write")
    args = ap.parse_args(argv)
    try:
        if args.command == "unship":
            print(f"wrote {unship(args.out)}: the shipped weights in float32 (train from it with --model)")
            return
        out = ship(args.model, args.out, args.format)
    except CheckpointError as e:  # a bad output folder, or a model trained with another tokenizer
        ap.exit(2, f"error: {e}\n")
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"shipped {args.model} into {out} ({args.format}, {(out / 'model.safetensors').stat().st_size:,} bytes of "
          f"weights); everything under {ASSETS}: {total:,} bytes")


if __name__ == "__main__":
    main()
