"""The full chat format (thinking switch, tools, tool calls, tool responses) rendered like transformers'
apply_chat_template, on the Gemma-4-style template letterpress ships in letterpress/chat_templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from letterpress.errors import RequestError
from letterpress.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "letterpress" / "assets" / "tiny_code"
TEMPLATE = ROOT / "letterpress" / "chat_templates" / "gemma4_tools.jinja"
# The control tokens of the Gemma 4 chat format (ids 46-52, 98, 100, 101, 105, 106 in the released vocabulary).
CONTROL_TOKENS = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
                  "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the docs",
    "parameters": {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer", "description": "At most this many"},
        "kind": {"type": "string", "enum": ["api", "guide"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "filter": {"type": "object", "nullable": True, "properties": {"since": {"type": "number"}}}}}}}

# §4.4 of the model digest: one tool, one call, one response, thinking on, byte for byte.
LITERAL_MESSAGES = [
    {"role": "user", "content": "Plan"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
LITERAL_PROMPT = (
    "<bos><|turn>system\n<|think|>\n"
    '<|tool>declaration:weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{description:<|"|>City'
    '<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n'
    "<|turn>user\nPlan<turn|>\n<|turn>model\n"
    '<|tool_call>call:weather{city:<|"|>Paris<|"|>}<tool_call|>'
    '<|tool_response>response:weather{value:<|"|>sunny<|"|>}<tool_response|><|channel>thought\n'
)

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hi there"}],
    "system": [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hi"}],
    "developer-parts": [{"role": "developer", "content": [{"type": "text", "text": "Rules"}]},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    "history-with-thought": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd<channel|>4"},
        {"role": "user", "content": "and 3+3?"}],
    "literal": LITERAL_MESSAGES,
    "two-calls-null-content": [
        {"role": "user", "content": "Compare"},
        {"role": "assistant", "content": None, "reasoning_content": "need both", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
            {"id": "b", "type": "function", "function": {"name": "search", "arguments": {
                "query": "rain", "limit": 3, "exact": True, "filter": {"since": 1.5, "tags": ["x", "y"]}}}}]},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "docs"}]},
        {"role": "tool", "tool_call_id": "a", "content": "cold"}],
    "call-with-text-and-response": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "weather", "arguments": {"city": "Nice"}}}]},
        {"role": "tool", "tool_call_id": "x", "content": "mild"},
        {"role": "user", "content": "And tomorrow?"}],
    "call-without-response": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [
            {"id": "y", "type": "function", "function": {"name": "weather", "arguments": {}}}]}],
    "string-arguments-then-answer": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": 'city:<|"|>Rome<|"|>'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "hot"},
        {"role": "assistant", "content": "It is hot."},
        {"role": "user", "content": "Thanks"}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_code's tokenizer with the Gemma 4 control tokens added, and the Gemma-4-style template."""
    out = tmp_path_factory.mktemp("gemma4_chat")
    backend = HFTokenizer.from_file(str(ASSETS / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    backend.save(str(out / "tokenizer.json"))
    shutil.copy(ASSETS / "tokenizer_config.json", out / "tokenizer_config.json")
    shutil.copy(TEMPLATE, out / "chat_template.jinja")
    return out


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def hf(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_literal_prompt_byte_for_byte(tok: Tokenizer, hf) -> None:
    ours = tok.apply_chat_template(LITERAL_MESSAGES, tools=[WEATHER], enable_thinking=True)
    assert ours == LITERAL_PROMPT
    assert hf.apply_chat_template(LITERAL_MESSAGES, tools=[WEATHER], enable_thinking=True, tokenize=False,
                                  add_generation_prompt=True) == LITERAL_PROMPT
    # Thinking off: no <|think|> line, and the open model turn ends at the tool response.
    off = tok.apply_chat_template(LITERAL_MESSAGES, tools=[WEATHER])
    assert off == LITERAL_PROMPT.replace("<|think|>\n", "").removesuffix("<|channel>thought\n")


def test_generation_prompt_and_thinking_switch(tok: Tokenizer) -> None:
    messages = CONVERSATIONS["plain"]
    assert tok.apply_chat_template(messages) == "<bos><|turn>user\nHi there<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert tok.apply_chat_template(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n")
    # The control tokens are single ids.
    ids = tok.encode_chat(messages, enable_thinking=True)
    assert ids[1] == tok.token_to_id("<|turn>") and tok.token_to_id("<|think|>") in ids


def _renders_like_transformers(tok: Tokenizer, hf, name: str, thinking: bool | None,
                               with_tools: bool) -> tuple[list[dict], dict]:
    """Assert our rendering of CONVERSATIONS[name] equals transformers' (with and without the generation
    prompt); returns the messages and keyword arguments used."""
    messages = CONVERSATIONS[name]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    if with_tools:
        kwargs["tools"] = [WEATHER, SEARCH]
    for generation_prompt in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        assert ours == theirs
    return messages, kwargs


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_matches_transformers(tok: Tokenizer, hf, name: str, thinking: bool | None, with_tools: bool) -> None:
    messages, kwargs = _renders_like_transformers(tok, hf, name, thinking, with_tools)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs)
    assert tok.encode_chat(messages, **kwargs) == list(ids)


def test_declarations_render_each_schema_feature(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CONVERSATIONS["plain"], tools=[SEARCH])
    assert ('<|tool>declaration:search{description:<|"|>Search the docs<|"|>,parameters:{properties:{'
            'filter:{nullable:true,properties:{since:{type:<|"|>NUMBER<|"|>}},type:<|"|>OBJECT<|"|>},'
            'kind:{enum:[<|"|>api<|"|>,<|"|>guide<|"|>],type:<|"|>STRING<|"|>},'
            'limit:{description:<|"|>At most this many<|"|>,type:<|"|>INTEGER<|"|>},'
            'query:{type:<|"|>STRING<|"|>},tags:{items:{type:<|"|>STRING<|"|>},type:<|"|>ARRAY<|"|>}},'
            'required:[<|"|>query<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>') in prompt


def test_calls_responses_and_reasoning_in_history(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CONVERSATIONS["two-calls-null-content"])
    assert prompt.endswith(
        "<|turn>model\n<|channel>thought\nneed both\n<channel|>"
        '<|tool_call>call:weather{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_call>call:search{exact:true,filter:{since:1.5,tags:[<|"|>x<|"|>,<|"|>y<|"|>]},limit:3,'
        'query:<|"|>rain<|"|>}<tool_call|>'
        '<|tool_response>response:search{value:<|"|>docs<|"|>}<tool_response|>'
        '<|tool_response>response:weather{value:<|"|>cold<|"|>}<tool_response|>')
    later = tok.apply_chat_template(CONVERSATIONS["string-arguments-then-answer"])
    # A JSON-string argument is pasted as given; the answer continues the same model turn; old thoughts dropped.
    assert ('<|tool_call>call:weather{city:<|"|>Rome<|"|>}<tool_call|><|tool_response>response:weather{value:'
            '<|"|>hot<|"|>}<tool_response|>It is hot.<turn|>\n<|turn>user\nThanks<turn|>\n') in later
    # Text beside the calls closes the turn after the responses; calls still waiting end at <|tool_response>.
    assert ('<tool_response|>Checking.<turn|>\n<|turn>user\nAnd tomorrow?<turn|>\n'
            in tok.apply_chat_template(CONVERSATIONS["call-with-text-and-response"]))
    assert tok.apply_chat_template(CONVERSATIONS["call-without-response"]).endswith(
        "<|turn>model\n<|tool_call>call:weather{}<tool_call|><|tool_response>")
    history = tok.apply_chat_template(CONVERSATIONS["history-with-thought"])
    assert "<|turn>model\n4<turn|>\n" in history and "add" not in history


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "assistant", "tool_calls": "weather"}, r"tool_calls must be a list"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, r"tool_calls\[0\] must be"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}, "arguments must be"),
        ({"role": "user", "content": "x", "tool_calls": []}, "only assistant messages"),
        ({"role": "tool", "tool_call_id": "a"}, r"content must be"),
    ],
)
def test_malformed_tool_messages(tok: Tokenizer, message: dict, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "q"}, message])


@pytest.mark.parametrize("tools, match", [
    ([json.dumps(WEATHER)], "tools must be a list"),
    ([{"type": "function", "function": {"name": 5}}], r"tools\[0\]: .* the name a string"),
    ([{"name": ["x"]}], r"tools\[0\]: .* the name a string"),
    # past the shape check, data the template cannot render is the request's fault (a 400), not a crash
    ([{"type": "function", "function": {"name": "f", "description": 5}}], "could not render"),
    ([{"type": "function", "function": {"name": "f", "parameters": 5}}], "could not render"),
])
def test_malformed_tools(tok: Tokenizer, tools: list, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        tok.apply_chat_template(CONVERSATIONS["plain"], tools=tools)


# The template of the models letterpress trains (tiny-code's): Gemma 3 turns with the same features.
TURNS_TEMPLATE = ROOT / "letterpress" / "chat_templates" / "gemma3_turns_tools.jinja"


@pytest.fixture(scope="module")
def turns_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("turns_chat")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, out / name)
    shutil.copy(TURNS_TEMPLATE, out / "chat_template.jinja")
    return out


@pytest.fixture(scope="module")
def turns_hf(turns_folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(turns_folder))


def test_shipped_tiny_code_template_is_the_turns_template() -> None:
    assert (ASSETS / "chat_template.jinja").read_text() == TURNS_TEMPLATE.read_text()


def test_turns_template_renders_plain_conversations_as_trained() -> None:
    tok = Tokenizer.from_dir(ASSETS)
    messages = [{"role": "system", "content": "Be terse.\n"}, {"role": "user", "content": "  x = 1 "},
                {"role": "assistant", "content": "ok "}, {"role": "user", "content": "again"}]
    assert tok.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe terse.\n\n\n  x = 1 <end_of_turn>\n<start_of_turn>model\nok <end_of_turn>\n"
        "<start_of_turn>user\nagain<end_of_turn>\n<start_of_turn>model\n")


def test_turns_template_carries_tools_calls_responses_and_thinking() -> None:
    tok = Tokenizer.from_dir(ASSETS)
    text = tok.apply_chat_template(LITERAL_MESSAGES, tools=[WEATHER], enable_thinking=True)
    assert text == (
        "<bos><start_of_turn>user\n<|think|>\n"
        '<|tool>declaration:weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{description:<|"|>City'
        '<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>\n\n'
        "Plan<end_of_turn>\n<start_of_turn>model\n"
        '<|tool_call>call:weather{city:<|"|>Paris<|"|>}<tool_call|><end_of_turn>\n'
        '<start_of_turn>tool\n<|tool_response>response:weather{value:<|"|>sunny<|"|>}<tool_response|><end_of_turn>\n'
        "<start_of_turn>model\n")
    off = tok.apply_chat_template(CONVERSATIONS["plain"], enable_thinking=False)
    assert off.endswith("<start_of_turn>model\n<|channel>thought\n<channel|>")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_turns_template_matches_transformers(turns_hf, turns_folder: Path, name: str, thinking: bool | None,
                                             with_tools: bool) -> None:
    _renders_like_transformers(Tokenizer.from_dir(turns_folder), turns_hf, name, thinking, with_tools)


def test_json_string_tool_arguments_render_in_the_call_syntax() -> None:
    """OpenAI clients, and our own ToolCall.to_openai(), give a call's arguments as a JSON string; rendered as
    given it reached the model as `call:f{{"city": "Riga"}}`. LLM.chat and training data now get what the
    server already did (vLLM: chat_utils._postprocess_messages)."""
    from letterpress.embedded import ASSETS

    tasks = Tokenizer.from_dir(ASSETS / "tiny_tasks")

    def conversation(arguments):
        return [{"role": "user", "content": "Time in Riga?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "14:05"}]

    as_text = tasks.apply_chat_template(conversation(json.dumps({"city": "Riga"})))
    assert as_text == tasks.apply_chat_template(conversation({"city": "Riga"}))
    assert 'call:get_time{city:<|"|>Riga<|"|>}' in as_text
