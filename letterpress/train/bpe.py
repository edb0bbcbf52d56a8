"""Train the byte-level BPE tokenizer of letterpress's own small code model.

The output folder looks like a Hugging Face checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja), so `letterpress.tokenizer.Tokenizer` and `transformers.AutoTokenizer` both load it.
"""

from __future__ import annotations

import json
import sysconfig
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Order fixes the ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <start_of_turn>=4, <end_of_turn>=5, <mask>=6.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>")
MODEL_MAX_LENGTH = 8192

# Gemma 3's turn format with the DiffusionGemma chat features (tools, calls, responses, thinking switch).
CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "chat_templates" / "gemma3_turns_tools.jinja").read_text(
    encoding="utf-8")

# Packages that are not representative library code (tests, the IDLE GUI, the removed 2to3 tool).
_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on `texts` and write the tokenizer files to `out_dir`; returns `out_dir`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # No normalizer: source code must round-trip byte for byte. No prefix space: code does not start with one.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token even if the corpus lacks it, so any text can be encoded without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like Gemma, a plain prompt encoded with add_special_tokens=True starts with <bos>.
    bos_id = SPECIAL_TOKENS.index("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos_id)]
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out_dir


def _tokenizer_config() -> dict:
    return {
        # transformers needs a class name to load the folder with AutoTokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "model_max_length": MODEL_MAX_LENGTH,
    }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_module(path: Path) -> str:
    """The top-level package or module a standard library file belongs to: `json` for json/decoder.py and for a
    json.py."""
    return path.relative_to(stdlib_root()).parts[0].removesuffix(".py")


def stdlib_python_files(exclude: Sequence[str] = ()) -> list[Path]:
    """The running Python's standard library `.py` files, without tests, IDLE, lib2to3, site-packages and the
    top-level packages/modules named in `exclude` (kept out for evaluation). Sorted, so training is repeatable."""
    root = stdlib_root()
    excluded = set(exclude)
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _SKIPPED_DIRS.intersection(parts[:-1]):
            continue
        if parts[0] in excluded or stdlib_module(path) in excluded:
            continue
        files.append(path)
    return sorted(files)


def read_source(path: Path) -> str:
    """A Python file's text, decoded with the encoding its coding cookie declares (UTF-8 by default)."""
    with tokenize.open(path) as f:
        return f.read()
