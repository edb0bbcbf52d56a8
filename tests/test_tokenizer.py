"""The shipped tokenizer, chat template rendering (checked against transformers) and input validation."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from letterpress.errors import CheckpointError, NotSupportedError, RequestError
from letterpress.tokenizer import Tokenizer
from letterpress.train import bpe

ASSETS = Path(__file__).resolve().parent.parent / "letterpress" / "assets" / "tiny_code"

# A Gemma 3 style template: system folded into the first turn, alternation enforced with raise_exception,
# loop.last, list-of-parts content, and tools rendered with tojson(indent=...).
GEMMA_LIKE_TEMPLATE = """\
{{ bos_token }}
{%- if tools -%}
{{ 'Tools:\\n' + (tools | tojson(indent=2)) + '\\n' }}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if loop.last and message['role'] == 'assistant' -%}
        {{ eos_token }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Write a function."}],
    "system+user": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def add(a, b):"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "  In place, with ünïcode ✓?  "},
    ],
    "parts": [
        {"role": "user", "content": [{"type": "text", "text": "def f(x):\n"}, {"type": "text", "text": "    return x"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(ASSETS)


@pytest.fixture(scope="module")
def gemma_like_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gemma_like")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, folder / name)
    (folder / "chat_template.jinja").write_text(GEMMA_LIKE_TEMPLATE, encoding="utf-8")
    return folder


def _hf_render(folder: Path, messages: list[dict], **kwargs) -> str:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


# ---- the shipped tokenizer ----------------------------------------------------------------------------------


def test_special_token_ids_are_fixed(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.special_ids() == set(range(7))
    assert tok.id_to_token(5) == "<end_of_turn>"
    assert tok.vocab_size == 4096


def test_round_trip_python_source(tok: Tokenizer) -> None:
    source = inspect.getsource(json.decoder) + "\ts = 'héllo 世界 😀'\n"
    ids = tok.encode(source)
    assert tok.decode(ids) == source
    assert len(ids) < len(source) / 2  # the BPE actually learned code fragments
    assert tok.bos_id not in ids


def test_bos_only_when_asked(tok: Tokenizer) -> None:
    assert tok.encode("x = 1", add_special_tokens=True) == [tok.bos_id, *tok.encode("x = 1")]
    # A rendered template already starts with <bos>; encode_chat must not add another.
    ids = tok.encode_chat(CONVERSATIONS["user"])
    assert ids[:2] != [tok.bos_id, tok.bos_id] and ids[0] == tok.bos_id


def test_shipped_template_format(tok: Tokenizer) -> None:
    rendered = tok.apply_chat_template(CONVERSATIONS["system+user"])
    assert rendered == (
        "<bos><start_of_turn>user\nYou write Python.\n\ndef add(a, b):<end_of_turn>\n<start_of_turn>model\n"
    )
    assert not tok.apply_chat_template(CONVERSATIONS["user"], add_generation_prompt=False).endswith("model\n")


def test_stdlib_files_skip_tests_and_held_out() -> None:
    files = bpe.stdlib_python_files(exclude=("json",))
    assert files == sorted(files)
    names = {f.name for f in files}
    assert "os.py" in names and "decoder.py" not in names
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(f.parts) for f in files)


# ---- parity with transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_shipped_template_matches_transformers(tok: Tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.apply_chat_template(messages) == _hf_render(ASSETS, messages)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_gemma_like_template_matches_transformers(gemma_like_dir: Path, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert Tokenizer.from_dir(gemma_like_dir).apply_chat_template(messages) == _hf_render(gemma_like_dir, messages)


def test_tools_render_like_transformers(gemma_like_dir: Path) -> None:
    tools = [{"type": "function", "function": {"name": "größe", "parameters": {"type": "object"}}}]
    messages = CONVERSATIONS["user"]
    ours = Tokenizer.from_dir(gemma_like_dir).apply_chat_template(messages, tools=tools)
    assert ours == _hf_render(gemma_like_dir, messages, tools=tools)
    assert "größe" in ours  # tojson keeps non-ASCII, as transformers' does


def test_raise_exception_is_a_request_error(gemma_like_dir: Path) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(RequestError, match="must alternate"):
        Tokenizer.from_dir(gemma_like_dir).apply_chat_template(messages)


# ---- loading ------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_invalid_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_precedence_and_dict_tokens(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"content": "<bos>", "special": True},
        "eos_token": "<end_of_turn>",
        "chat_template": [{"name": "default", "template": "config"}, {"name": "tool_use", "template": "tools"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 5, None)
    assert tok.apply_chat_template(CONVERSATIONS["user"]) == "config"
    assert tok.apply_chat_template(CONVERSATIONS["user"], tools=[]) == "tools"

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "jinja"


def test_no_chat_template(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None and tok.bos_id is None
    with pytest.raises(RequestError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS["user"])


# ---- message validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\.content must be"),
        ([{"role": "user"}], r"messages\[0\]\.content must be"),
        ([{"role": "user", "content": [{"text": "no type"}]}], r"messages\[0\]\.content\[0\] must be a text part"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "must be a text part"),
    ],
)
def test_malformed_messages(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["image_url", "input_image", "video_url"])
def test_media_parts_are_not_read_by_the_tokenizer(tok: Tokenizer, kind: str) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": kind, kind: "x"}]}]
    with pytest.raises(NotSupportedError, match="media parts are read by LLM.chat and the server"):
        tok.apply_chat_template(messages)


def test_other_part_types_not_supported(tok: Tokenizer) -> None:
    with pytest.raises(NotSupportedError, match="audio"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


def test_lone_system_message_rejected_by_shipped_template(tok: Tokenizer) -> None:
    with pytest.raises(RequestError, match="followed by a user message"):
        tok.apply_chat_template([{"role": "system", "content": "hi"}])


def test_text_that_is_not_valid_unicode_is_a_request_error(tok):
    """generate / infill / edit tokenize plain text: a lone surrogate there is the same clear error as in a chat
    message, not a TypeError from inside the tokenizers library."""
    for encode in (tok.encode, tok.encode_with_offsets, tok.count_tokens):
        with pytest.raises(RequestError, match="lone UTF-16 surrogate"):
            encode("a\ud800b")
    with pytest.raises(RequestError, match="must be a string"):
        tok.encode(b"bytes")
