"""Request fields that constrain the output: OpenAI's `response_format`, vLLM's `structured_outputs`, and
`tool_choice` "required" / a named function (letterpress.structured does the constraining).

Each becomes one `StructuredOutputsParams` (a regex for tool calls) for every row of the request; anything
that cannot be honoured is a 400 naming the field and the reason (a grammar, an unsupported schema keyword,
an invalid regex). Chat requests whose prompt leaves the model thinking keep the thought channel outside
the constraint: the answer may start with (or, when the prompt opened the channel, must start by closing)
a thought, and the constraint applies after it.
"""

from __future__ import annotations

from typing import Any

from ..structured import SchemaError, StructuredOutputsParams, tool_call_regex
from .schemas import ApiError

# The Gemma chat markers a constrained chat answer may contain (thought channel, tool calls)
CHAT_MARKERS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>')
_VLLM_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_VLLM_IGNORABLE = {"disable_fallback": (None, False), "disable_any_whitespace": (None, False, True),
                   "disable_additional_properties": (None, False, True), "whitespace_pattern": (None,)}


def param_of(body: Any) -> str:
    """The request field a constraint came from, for an error about it."""
    for name in ("structured_outputs", "response_format"):
        if getattr(body, name, None) is not None:
            return name
    return "tool_choice"


def from_body(body: Any) -> StructuredOutputsParams | None:
    """`response_format` and `structured_outputs` of a completions or chat request (at most one of them)."""
    response_format = getattr(body, "response_format", None)
    structured = getattr(body, "structured_outputs", None)
    spec = _response_format(response_format)
    if structured is not None:
        if spec is not None:
            raise ApiError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        spec = _structured_outputs(structured)
    return spec


def _response_format(value: dict | None) -> StructuredOutputsParams | None:
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        if len(value) != 1:
            raise ApiError(400, "response_format {'type': 'text'} takes no other field", param="response_format")
        return None
    if kind == "json_object":
        return _checked(StructuredOutputsParams(json_object=True), "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return _checked(StructuredOutputsParams(json=spec["schema"]), "response_format")
    raise ApiError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
                   param="response_format")


def _structured_outputs(value: Any) -> StructuredOutputsParams:
    if not isinstance(value, dict):
        raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
    for key, allowed in _VLLM_IGNORABLE.items():
        if value.get(key) not in allowed:
            raise ApiError(400, f"structured_outputs.{key} = {value[key]!r} is not supported", param="structured_outputs")
    unknown = sorted(set(value) - set(_VLLM_KINDS) - set(_VLLM_IGNORABLE))
    if unknown:
        raise ApiError(400, f"structured_outputs.{unknown[0]} is not supported by letterpress (only "
                            f"{', '.join(_VLLM_KINDS)})", param="structured_outputs", code="unsupported")
    spec = StructuredOutputsParams(**{k: value[k] for k in _VLLM_KINDS if k in value})
    return _checked(spec, "structured_outputs")


def _checked(spec: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    """Build the regex now, so that a bad schema is a 400 before any row runs; a regex is checked when it
    is compiled against the vocabulary (LLM.make_request)."""
    try:
        regex = spec.to_regex()
    except SchemaError as e:
        raise ApiError(400, f"{param}: {e}", param=param, code="unsupported" if "not supported" in str(e) else None)
    return StructuredOutputsParams(regex=regex)


def tool_choice_spec(tools: list[dict], name: str | None, parallel: bool) -> str:
    """The regex of `tool_choice` "required" (name None) or a named function."""
    try:
        return tool_call_regex(tools, name, parallel)
    except SchemaError as e:
        raise ApiError(400, f"tool_choice: {e}", param="tool_choice") from None


def for_chat(spec: StructuredOutputsParams | None, tool_regex: str | None, prompt_opens_reasoning: bool,
             thinking: bool, or_tools: str | None = None) -> StructuredOutputsParams | None:
    """The chat answer's constraint: the tool calls or the format, after an optional thought. `or_tools`: the
    calls tool_choice "auto" allows beside the format (either may come)."""
    if tool_regex is not None and spec is not None:
        raise ApiError(400, "tool_choice 'required' / a named function cannot be combined with response_format "
                            "or structured_outputs", param="tool_choice")
    body = tool_regex if tool_regex is not None else (spec.regex if spec is not None else None)
    if body is not None and or_tools is not None:
        body = f"(?:{or_tools})|(?:{body})"
    if body is None:
        return None
    if prompt_opens_reasoning:  # the prompt ends inside the thought channel: close it first
        prefix = r"[^<]*<channel\|>"
    elif thinking:
        prefix = r"(?:<\|channel>thought\n[^<]*<channel\|>)?"
    else:
        prefix = ""
    return StructuredOutputsParams(regex=prefix + f"(?:{body})", special_tokens=CHAT_MARKERS)

