"""The tokenizer and chat template of a Hugging Face style checkpoint folder.

We read the files `transformers` reads (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja / chat_template.json) without depending on `transformers` at run time, and render chat
templates the way `transformers` does, so a prompt built here tokenizes exactly like one built there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, NotSupportedError, RequestError

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})
# transformers copies a message's reasoning under all of these names, because templates read different ones.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# OpenAI's chat roles (less the deprecated "function", whose calls we do not take); the DiffusionGemma
# templates render system/developer as the system turn, assistant as "model", and read tool responses.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class Tokenizer:
    """A `tokenizers` tokenizer plus the special tokens and chat template(s) of its checkpoint."""

    def __init__(
        self,
        backend: _HFTokenizer,
        special_tokens: Mapping[str, str],
        chat_templates: Mapping[str, str],
        add_bos_token: bool = False,
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._chat_templates = dict(chat_templates)
        self.add_bos_token = add_bos_token
        self._max_chars_per_token: int | None = 0  # 0: not computed yet

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint folder (as written by `save_pretrained`)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file} is missing; letterpress needs a fast tokenizer (tokenizer.json)")
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from e

        config = _read_json(folder / "tokenizer_config.json")
        # tokenizer_config.json is the current format; special_tokens_map.json only fills in what it lacks.
        token_map = _read_json(folder / "special_tokens_map.json")
        special_tokens = {}
        for name in _NAMED_SPECIAL_TOKENS:
            token = _token_content(config.get(name)) or _token_content(token_map.get(name))
            if token is not None:
                special_tokens[name] = token
        return cls(
            backend,
            special_tokens,
            _read_chat_templates(folder, config),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    # ---- vocabulary ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None if the checkpoint has none."""
        return self._chat_templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special, and of the named special tokens (bos, eos, pad, ...)."""
        ids = {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        named = (self._backend.token_to_id(token) for token in self._special_tokens.values())
        return ids | {i for i in named if i is not None}

    def _special_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    # ---- text <-> ids --------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        `add_special_tokens` defaults to False because rendered chat templates already start with `<bos>`;
        encoding one with True would give the model a second BOS. Pass True for a plain prompt that should
        get the checkpoint's usual prefix (BOS for Gemma).
        """
        ids = self._encode(text, add_special_tokens).ids
        bos = self.bos_id
        # Some tokenizer.json files have no post-processor and rely on tokenizer_config's add_bos_token instead.
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens) and each token's (start, end) character range in `text`.
        Byte-level tokens that split one character all get that character's range (used by editing to map
        character spans to tokens)."""
        encoding = self._encode(text, False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def count_tokens(self, text: str) -> int:
        """len(encode(text)) without building the list of ids."""
        return len(self._encode(text, False))

    def _encode(self, text: str, add_special_tokens: bool):
        if not isinstance(text, str):
            raise RequestError(f"text to tokenize must be a string, got {type(text).__name__}")
        _check_text(text, "the text")  # the tokenizers library fails on a lone surrogate with a TypeError
        # encode_batch releases the GIL while it works and encode does not: a long text tokenized on a worker
        # thread (the server does) then leaves the other threads (its event loop) running. Same ids.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def max_chars_per_token(self) -> int | None:
        """An upper bound on the characters of input text one token can stand for, so that a text longer than
        `n * bound` characters is known to take more than n tokens without tokenizing it. None when the
        normalizer could shorten the text (then no such bound holds)."""
        if self._max_chars_per_token == 0:
            normalizer = self._backend.normalizer
            config = None if normalizer is None else json.loads(normalizer.__getstate__())
            vocab = self._backend.get_vocab(with_added_tokens=True)
            # A token's string has at least one character per character it covers: byte-level tokens write one
            # character per byte, SentencePiece writes "▁" for a space and "<0x41>" for a byte.
            longest = max((len(token) for token in vocab), default=1)
            self._max_chars_per_token = longest if _never_shortens(config) else None
        return self._max_chars_per_token

    # ---- chat ----------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` with the checkpoint's chat template, exactly as transformers'
        `apply_chat_template(..., tokenize=False)` does. Extra keyword arguments (tools=..., documents=...,
        enable_thinking=...) become template variables. `tools` are OpenAI-style function schemas; assistant
        messages may carry `tool_calls` (arguments as a dict, or a JSON string the template pastes as given) and
        `role: "tool"` messages answer them, all handed to the template as transformers hands them."""
        _naming("messages", _validate_messages, messages)
        _naming("tools", _validate_tools, extra.get("tools"))
        template = self._compiled_template(self._pick_template(extra.get("tools")))
        context = {
            **self._special_tokens,
            "tools": None,
            "documents": None,
            **extra,
            "messages": [_template_message(m) for m in _object_arguments(messages)],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**context)
        # raise_exception's RequestError passes through. The template is the checkpoint's; what breaks it is the
        # data (a tool's description a number, its parameters a string, ...): the caller's to mend, not a crash.
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            raise RequestError(f"the chat template could not render these messages: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids of the rendered chat; the template supplies BOS, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra))

    def set_chat_template(self, source: str) -> None:
        """Use `source` for every conversation (with or without tools) instead of the checkpoint's template(s),
        as vLLM's `--chat-template` does. A template that is not valid Jinja is a CheckpointError now, not at the
        first request."""
        try:
            _compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"the chat template given is not valid Jinja: {e}") from e
        self._chat_templates = {"default": source}

    def _pick_template(self, tools: Any) -> str:
        # Same choice as transformers: a "tool_use" template when tools are given and one exists.
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        template = self.chat_template
        if template is None:
            raise RequestError("this checkpoint has no chat template; use a plain prompt")
        return template

    def _compiled_template(self, source: str) -> jinja2.Template:
        try:
            return _compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"the checkpoint's chat template is not valid Jinja: {e}") from e


# ---- files ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """The object in an optional JSON file; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Named chat templates; precedence chat_template.jinja > chat_template.json > tokenizer_config.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        return _parse_templates(_read_json(json_file).get("chat_template"), json_file)
    return _parse_templates(config.get("chat_template"), folder / "tokenizer_config.json")


def load_chat_template(value: str) -> str:
    """vLLM's `--chat-template` value: the path of a template file, or else the template itself. A value that
    cannot be opened and has none of `{`, `}` or a newline is taken for a mistyped path (an error), not for a
    template that writes that text."""
    try:
        return Path(value).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"--chat-template {value}: the file is not UTF-8 text ({e.reason})") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character, which no path holds
        if not any(c in value for c in "{}\n"):
            raise CheckpointError(f"--chat-template {value!r} looks like a file path, but it cannot be read "
                                  f"({getattr(e, 'strerror', None) or e}); pass a template file or the template "
                                  "itself") from None
    return value


def _parse_templates(value: Any, source: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


# ---- chat template rendering --------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. roles that do not alternate): that is the user's input.
    raise RequestError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_template_cache: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    """Compile with the same Jinja environment transformers uses (sandboxed, trim_blocks, lstrip_blocks)."""
    template = _template_cache.get(source)
    if template is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        template = _template_cache[source] = env.from_string(source)
    return template


def _template_message(message: dict) -> dict:
    """The message as transformers hands it to the template: keys set to None dropped (templates test for a
    missing key, not for None), and reasoning copied under every name templates read it by."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _never_shortens(normalizer: dict | None) -> bool:
    """Whether a tokenizer.json normalizer keeps at least as many characters as it is given."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_never_shortens(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":  # e.g. SentencePiece's " " -> "▁"
        pattern = normalizer.get("pattern", {})
        return "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"])
    return kind in ("Prepend", "NFD", "NFKD", "Lowercase", "ByteLevel")


def _naming(param: str, check: Callable[[Any], None], value: Any) -> None:
    """`check(value)`, its RequestError naming the request field `param` (the server's error says it)."""
    try:
        check(value)
    except RequestError as e:
        e.param = param
        raise


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            got = f"{role!r} is not a chat role" if isinstance(role, str) else "must be a string"
            raise RequestError(f"{where}.role {got}: use one of {', '.join(CHAT_ROLES)}")
        if message.get("tool_calls") is not None:
            _validate_tool_calls(message, where)
            if message.get("content") is None:  # OpenAI sends content null beside tool calls
                continue
        _validate_content(message.get("content"), f"{where}.content")


def _validate_tool_calls(message: dict, where: str) -> None:
    calls = message["tool_calls"]
    if message.get("role") != "assistant":
        raise RequestError(f"{where}: only assistant messages carry tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list of {{id, type, function: {{name, arguments}}}}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{j}] must be {{id, type, function: {{name, arguments}}}}")
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise RequestError(f"{where}.tool_calls[{j}].function.arguments must be an object or a JSON string")


def _validate_tools(tools: Any) -> None:
    # transformers also takes Python functions here (and builds their schemas); a request can only send JSON.
    if tools is None:
        return
    shape = "tools must be a list of {type: 'function', function: {name, description, parameters}}"
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError(shape)
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)  # transformers also takes the bare {name, description, parameters}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"tools[{i}]: {shape}, with the name a string")


def _check_text(text: str, where: str) -> None:
    """Text must be valid Unicode: a lone UTF-16 surrogate (JSON's "\\ud800" alone) cannot be encoded."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise RequestError(f"{where} holds a lone UTF-16 surrogate (U+{ord(text[at]):04X} at character {at}), "
                           "which is not valid Unicode")


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone surrogate (a str can; UTF-8 cannot encode one), or None. Fast: ASCII is
    checked at C speed, anything else by encoding it (~4x faster than a regular expression search)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _validate_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        _check_text(content, where)
        return
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None
        if kind in ("image", "video") and set(part) == {"type"}:
            continue  # a placeholder the template writes as <|image|> / <|video|> (letterpress.media.messages)
        if kind in _IMAGE_PART_TYPES or kind in ("video", "video_url"):
            raise NotSupportedError(f"{where}[{j}]: media parts are read by LLM.chat and the server, not by the "
                                    "tokenizer (which renders only bare {\"type\": \"image\"} placeholders)")
        if kind is not None and kind != "text":
            raise NotSupportedError(f"{where}[{j}] has type {kind!r}; only text parts are supported")
        if kind is None or not isinstance(part.get("text"), str):
            raise RequestError(f'{where}[{j}] must be a text part: {{"type": "text", "text": "..."}}')
        _check_text(part["text"], f"{where}[{j}].text")


def _object_arguments(messages: list[Any]) -> list[Any]:
    """Assistant tool-call arguments as objects: OpenAI clients (and `ToolCall.to_openai()`) give them as JSON
    strings, and a template pastes a string as it is, so a JSON string would reach the model in JSON, not in its
    call syntax. vLLM does the same for LLM.chat and its server (chat_utils._postprocess_messages)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list) and any(_string_arguments(c) for c in calls):
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _string_arguments(call: Any) -> bool:
    return isinstance(call, dict) and isinstance(call.get("function"), dict) and \
        isinstance(call["function"].get("arguments"), str)


def _with_object_arguments(call: Any) -> Any:
    if not _string_arguments(call):
        return call
    try:
        arguments = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: pasted as given (the model's own syntax, say)
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**call["function"], "arguments": arguments}}
