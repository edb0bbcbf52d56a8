"""Training data: JSONL files -> token ids, stored compactly, and a deterministic example order.

A line is either {"prompt": "...", "completion": "..."} or {"messages": [...]} (chat; the last message must be
the assistant's and is the target, everything before it is rendered with the checkpoint's chat template and
add_generation_prompt=True). Blank lines are skipped; other keys are ignored. Every line is checked when the file
is read, so a bad line fails the run before the first step, naming the file and line.

The order examples are visited in is a pure function of (seed, position): epoch e is a seeded permutation, and
the stream runs across epoch boundaries. Resuming at a position, or splitting a global batch across processes,
therefore needs no saved iterator state.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError, LetterpressError
from ..tokenizer import Tokenizer
from .loss import Example

log = logging.getLogger(__name__)


class TokenizedDataset:
    """Examples held as one int32 tensor of ids plus offsets: millions of short examples fit in memory."""

    def __init__(self, examples: Iterable[Example] = ()):
        ids, starts, prompt_lens, total_lens = array("i"), array("q"), array("i"), array("i")
        for ex in examples:
            starts.append(len(ids))
            prompt_lens.append(len(ex.prompt))
            total_lens.append(len(ex.prompt) + len(ex.target))
            ids.extend(ex.prompt)
            ids.extend(ex.target)
        self.ids = torch.frombuffer(ids, dtype=torch.int32).clone() if len(ids) else torch.zeros(0, dtype=torch.int32)
        self.starts = torch.tensor(starts.tolist(), dtype=torch.long)
        self.prompt_lens = torch.tensor(prompt_lens.tolist(), dtype=torch.long)
        self.total_lens = torch.tensor(total_lens.tolist(), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Example:
        start, p, n = int(self.starts[i]), int(self.prompt_lens[i]), int(self.total_lens[i])
        ids = self.ids[start:start + n].tolist()
        return Example(prompt=ids[:p], target=ids[p:])

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Iterable[int]) -> "TokenizedDataset":
        return TokenizedDataset(self[i] for i in indices)

    def split(self, held_out_fraction: float, seed: int) -> tuple["TokenizedDataset", "TokenizedDataset"]:
        """(train, held out): a seeded random `held_out_fraction` of the examples is held out."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_held = int(round(len(self) * held_out_fraction))
        if held_out_fraction > 0 and len(self) > 1:
            n_held = max(n_held, 1)  # a fraction asked for is never nothing (sklearn and HF round up too)
        return self.subset(sorted(order[n_held:])), self.subset(sorted(order[:n_held]))


@dataclass(frozen=True)
class DataFormat:
    chat_template: bool = False  # wrap prompt/completion lines as one user turn + one assistant turn
    max_length: int | None = None  # skip examples whose prompt + target + EOS is longer


def read_jsonl(path: str | Path, tokenizer: Tokenizer, fmt: DataFormat = DataFormat()) -> TokenizedDataset:
    """Read and tokenize a JSONL file; raises DataError naming the file and line of the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    skipped = 0

    def examples() -> Iterator[Example]:
        nonlocal skipped
        with open(path, "rb") as f:  # bytes, so that a bad encoding is reported with its line number
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is skipped
                    if not line.strip():
                        continue
                    example = parse_line(line, tokenizer, fmt)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}, line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                except DataError as e:
                    raise DataError(f"{path}, line {number}: {e}") from None
                if fmt.max_length is not None and len(example.prompt) + len(example.target) + 1 > fmt.max_length:
                    skipped += 1
                    continue
                yield example

    dataset = TokenizedDataset(examples())
    if skipped:
        log.warning("%s: skipped %d examples longer than %d tokens", path, skipped, fmt.max_length)
    if not len(dataset):
        raise DataError(f"{path}: no examples")
    return dataset


def parse_line(line: str, tokenizer: Tokenizer, fmt: DataFormat = DataFormat()) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return chat_example(record["messages"], tokenizer, record.get("tools"))
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(f'"{key}" must be a string, got {_kind(value)}')
        if fmt.chat_template:
            return chat_example([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                tokenizer)
        return prompt_completion_example(prompt, completion, tokenizer)
    raise DataError('expected {"prompt", "completion"} or {"messages"}; found keys '
                    + (", ".join(sorted(record)) or "none"))


def prompt_completion_example(prompt: str, completion: str, tokenizer: Tokenizer) -> Example:
    # The prompt gets the checkpoint's usual prefix (BOS), as `letterpress generate` encodes a plain prompt.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not prompt_ids:
        raise DataError("the prompt is empty and the tokenizer adds no BOS: the decoder needs some context")
    return Example(prompt=prompt_ids, target=tokenizer.encode(completion))


def chat_example(messages, tokenizer: Tokenizer, tools: list[dict] | None = None) -> Example:
    """The conversation's prompt as inference renders it (history, then the generation prompt) and, as the
    target, what the full conversation renders after the point where the two part. They part after the
    generation prompt's role marker, or earlier where the template adds something only for generating: the
    Gemma 4 template opens an empty thought channel there (`<|channel>thought\n<channel|>`), which a turn in
    the history does not show. `tools`: the line's top-level "tools" (OpenAI's fine-tuning format, TRL's
    column), declared to the model as at inference."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError('"messages" must be a list of at least two messages (a prompt and the assistant reply)')
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise DataError('the last message must have role "assistant": it is the training target')
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError('"tools" must be a list of tool declarations ({"type": "function", "function": {...}})')
    extra = {"tools": tools} if tools else {}
    try:
        history = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=False, **extra)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, **extra)
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **extra)
    except LetterpressError as e:
        raise DataError(f"messages: {e}") from None
    if not (prompt.startswith(history) and full.startswith(history)):
        raise DataError("the chat template renders the history differently with the reply after it; cannot split "
                        "the conversation into prompt and target")
    generation, reply = prompt[len(history):], full[len(history):]
    # The longest run of the generation prompt's whole tokens that the reply also starts with: whole tokens, so
    # that a reply opening with "<|tool_call>" does not share "<|" of "<|channel>" and lose it from its target.
    _, offsets = tokenizer.encode_with_offsets(generation)
    shared = max((end for _, end in offsets if reply.startswith(generation[:end])), default=0)
    if not reply[shared:]:
        raise DataError("the chat template renders no reply after the prompt; cannot split the conversation")
    # Encoded separately, as at inference: the prompt alone, then the model's continuation.
    return Example(prompt=tokenizer.encode(prompt), target=tokenizer.encode(reply[shared:]))


def _kind(value) -> str:
    return "nothing" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------- example order
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def example_generator(seed: int, position: int, stream: int = 0) -> torch.Generator:
    """The generator for the example at `position` of a run's stream (`stream` 0 = training, 1 = eval)."""
    return torch.Generator().manual_seed(_mix(seed, stream, position))


class ExampleOrder:
    """position -> dataset index: epoch e = position // n visits a permutation seeded by (seed, e)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise DataError("the training set is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, 2, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return int(self._perm[offset])
