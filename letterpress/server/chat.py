"""The chat side of /v1/chat/completions: tools and template kwargs in, reasoning and tool calls out.

In: `tools` and `chat_template_kwargs` (e.g. `{"enable_thinking": true}`) go to the chat template, as
transformers' `apply_chat_template(messages, tools=..., **kwargs)` takes them; assistant `tool_calls` whose
arguments are a JSON string (as OpenAI clients send them) are handed to the template as objects, as vLLM does,
so the template writes them in the model's own call syntax. `tool_choice` "auto" and "none" are honoured
("none": calls are not parsed); "required" and a named function are enforced: the canvas is constrained
(letterpress.structured) to the Gemma call syntax for (that) tool, with arguments valid against its JSON schema.
`response_format` / `structured_outputs` constrain the answer after any thought (server/structured.py).

Out: each choice's text is decoded with special tokens kept and split by `letterpress.chat_output` into
`content`, `reasoning` (vLLM's field; also `reasoning_content` for older clients) and OpenAI `tool_calls`;
a choice with calls finishes with "tool_calls". Streamed deltas and the whole message come from the same
parser, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..chat_output import ChatDelta, ChatOutput, StreamParser, prompt_opens_reasoning
from ..structured import StructuredOutputsParams
from ..tokenizer import Tokenizer
from . import structured
from .schemas import ApiError, ChatCompletionRequest

# Template variables a request may not set through chat_template_kwargs (they have their own fields).
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")
# Tokens the parser reads itself; every other special token is dropped from what the user sees.
_FORMAT_TOKENS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<turn|>", "<|turn>",
                  "<|tool_response>")


@dataclass
class ChatOptions:
    """How one request's choices are parsed."""

    tool_calls: bool  # parse tool calls (tools given, tool_choice not "none")
    tool_names: frozenset[str]
    start_in_reasoning: bool  # the prompt ends inside an open thought channel
    parallel_tool_calls: bool
    include_reasoning: bool
    hidden: tuple[str, ...]  # special tokens to drop from the output
    structured: StructuredOutputsParams | None = None  # the constraint on every row (tool_choice, formats)


def template_kwargs(requested: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of a request's `chat_template_kwargs`; a 400 if it sets what the request's own fields set."""
    kwargs = dict(requested or {})
    reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise ApiError(400, f"chat_template_kwargs may not set {reserved[0]!r}; use the request field",
                       param="chat_template_kwargs")
    return kwargs


def render_chat(tokenizer: Tokenizer, body: ChatCompletionRequest) -> tuple[str, ChatOptions]:
    """The rendered prompt and the parsing options of a chat request (400s for what we cannot do)."""
    choice, name = _tool_choice(body)
    if choice in ("required", "named") and body.stop_strings():  # as stop_token_ids (app.make_job)
        raise ApiError(400, "stop cannot be combined with tool_choice 'required' or a named function: a stop string "
                            "inside the forced tool call would cut it", param="stop", code="unsupported")
    spec = structured.from_body(body)
    kwargs = template_kwargs(body.chat_template_kwargs)
    tools = body.tools or None
    if tools is not None:
        kwargs["tools"] = tools
    prompt = tokenizer.apply_chat_template(body.messages, **kwargs)
    names = frozenset(t["function"]["name"] for t in tools or ()
                      if isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str))
    special = (tokenizer.id_to_token(i) for i in tokenizer.special_ids())
    parallel = body.parallel_tool_calls is not False
    tool_regex = structured.tool_choice_spec(tools, name, parallel) if choice in ("required", "named") else None
    # tool_choice auto beside a response format: a tool call or the format (as OpenAI answers), not the format
    # alone, which left an agent with tools and an output type no way to call a tool
    or_tools = structured.tool_choice_spec(tools, None, parallel) if choice == "auto" and spec is not None else None
    opens = prompt_opens_reasoning(prompt)
    options = ChatOptions(
        tool_calls=tools is not None and choice != "none",
        tool_names=names,
        start_in_reasoning=opens,
        parallel_tool_calls=parallel,
        include_reasoning=body.include_reasoning,
        hidden=tuple(sorted(t for t in special if t and t not in _FORMAT_TOKENS)),
        structured=structured.for_chat(spec, tool_regex, opens, bool(kwargs.get("enable_thinking")), or_tools),
    )
    return prompt, options


def _tool_choice(body: ChatCompletionRequest) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", the named function's name)."""
    choice = body.tool_choice
    if choice is None:
        return ("auto" if body.tools else "none"), None
    if choice in ("auto", "none", "required"):
        if choice != "none" and not body.tools:
            raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return choice, None
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str):
            raise ApiError(400, "a named tool_choice is {'type': 'function', 'function': {'name': ...}}",
                           param="tool_choice")
        if not body.tools:
            raise ApiError(400, "tool_choice names a function but the request has no tools", param="tool_choice")
        return "named", function["name"]
    raise ApiError(400, f"tool_choice must be 'auto', 'none', 'required' or a named function, not {choice!r}",
                   param="tool_choice")


class ChatChoice:
    """One choice's parser: text deltas in, OpenAI chat deltas (and at the end the message) out."""

    def __init__(self, options: ChatOptions) -> None:
        self.options = options
        self.parser = StreamParser(tool_calls=options.tool_calls, tool_names=options.tool_names,
                                   start_in_reasoning=options.start_in_reasoning, hidden=options.hidden)
        self.output = ChatOutput()
        self.calls_sent = 0

    def feed(self, text: str) -> list[dict]:
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        return self._deltas(self.parser.finish())

    def finish_reason(self, reason: str) -> str:
        # as vLLM: a choice that called tools finishes with "tool_calls", whatever ended its text
        return "tool_calls" if self.output.tool_calls else reason

    def message(self) -> dict:
        out = self.output
        # OpenAI sends content null beside tool calls when the model wrote no text
        content = (out.content or None) if out.tool_calls else out.content
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if out.reasoning:
            message["reasoning"] = message["reasoning_content"] = out.reasoning
        if out.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in out.tool_calls]
        return message

    def _deltas(self, deltas: list[ChatDelta]) -> list[dict]:
        """One OpenAI delta per kind in a row: runs of content (or reasoning) become one delta."""
        result: list[dict] = []
        for delta in deltas:
            if delta.tool_call is not None:
                if self.calls_sent and not self.options.parallel_tool_calls:
                    continue  # parallel_tool_calls: false keeps the first call
                self.output.tool_calls.append(delta.tool_call)
                result.append({"tool_calls": [{"index": self.calls_sent, **delta.tool_call.to_openai()}]})
                self.calls_sent += 1
                continue
            if not self.options.include_reasoning:
                delta = ChatDelta(content=delta.content)
            self.output.content += delta.content
            self.output.reasoning += delta.reasoning
            if delta.content:
                if result and set(result[-1]) == {"content"}:
                    result[-1]["content"] += delta.content
                else:
                    result.append({"content": delta.content})
            if delta.reasoning:
                if result and set(result[-1]) == {"reasoning", "reasoning_content"}:
                    result[-1]["reasoning"] += delta.reasoning
                    result[-1]["reasoning_content"] += delta.reasoning
                else:
                    result.append({"reasoning": delta.reasoning, "reasoning_content": delta.reasoning})
        return result
