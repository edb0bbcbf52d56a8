"""What a client written for `vllm serve` meets beyond the OpenAI API (README, "vLLM compatibility").

- `POST /tokenize` and `POST /detokenize` with vLLM's request and response shapes (a `prompt`, or chat
  `messages` rendered exactly as /v1/chat/completions renders them), and `GET /version`;
- CORS (`--allowed-origins`, `--allowed-methods`, `--allowed-headers`, `--allow-credentials`) and the
  `X-Request-Id` header (echoed; it names the response, `chatcmpl-<id>`, as in vLLM);
- vLLM's sampling fields: `top_k`, `stop_token_ids`, `skip_special_tokens`, and the DiffusionGemma keys of
  `vllm_xargs` (`diffusion_max_steps` is our `max_denoising_steps`; the others are refused with the reason).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers, MutableHeaders

from ..engine.llm import soft_tokens_of
from .body import parse_json, validate_body
from .chat import render_chat, template_kwargs
from .schemas import ApiError, ChatCompletionRequest

if TYPE_CHECKING:
    from .core import ServerContext

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 256  # a longer header is refused: it becomes the response's id and every log line


# ---------------------------------------------------------------------------------- /tokenize, /detokenize
class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # BOS, as /v1/completions adds it
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[Any]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes BOS itself
    return_token_strs: bool | None = False
    chat_template: str | None = None  # refused: as vLLM without --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # {"max_soft_tokens": T}: the image tier, as in chat


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def tokenize_body(data: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """vLLM's union: a body with `messages` is a chat, anything else a prompt."""
    value = parse_json(data)
    model = TokenizeChatRequest if isinstance(value, dict) and "messages" in value else TokenizeCompletionRequest
    return validate_body(value, model)


def tokenize(server: ServerContext, body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
    """The token ids /v1/completions (a prompt) or /v1/chat/completions (messages) would give the model."""
    server.check_model(body.model)
    tokenizer = server.llm.tokenizer
    if isinstance(body, TokenizeChatRequest):
        if body.chat_template is not None:
            raise ApiError(400, "a chat_template in the request is not accepted (vLLM also refuses it unless "
                                "started with --trust-request-chat-template); start letterpress serve with "
                                "--chat-template instead", param="chat_template", code="unsupported")
        if body.continue_final_message:
            raise ApiError(400, "continue_final_message is not supported by letterpress", code="unsupported",
                           param="continue_final_message")
        kwargs = template_kwargs(body.chat_template_kwargs)
        tools = body.tools or None  # vLLM's /tokenize takes an empty list as no tools
        chat = ChatCompletionRequest.model_validate({"messages": body.messages, "tools": tools,
                                                     "chat_template_kwargs": body.chat_template_kwargs,
                                                     "mm_processor_kwargs": body.mm_processor_kwargs})

        def render(messages: list[Any]) -> tuple[str, None]:
            if body.add_generation_prompt:  # the very prompt /v1/chat/completions renders
                text, _ = render_chat(tokenizer, chat.model_copy(update={"messages": messages}))
            else:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                     **kwargs, **({"tools": tools} if tools else {}))
            server.check_chars(text, "the conversation (rendered by the chat template)", "messages")
            return text, None

        # as the chat route: image and video parts fetched, decoded and counted as their soft tokens
        ids, _, _ = server.llm.chat_prompt(body.messages, render, server.config.media_limits,
                                           soft_tokens_of(body.mm_processor_kwargs))
        bos = tokenizer.bos_id
        if body.add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
    else:
        server.check_chars(body.prompt, "the prompt", "prompt")
        ids = server.llm.tokenize(body.prompt) if body.add_special_tokens else tokenizer.encode(body.prompt)
    return {"count": len(ids), "max_model_len": server.llm.max_model_len, "tokens": ids,
            "token_strs": [tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None}


def detokenize(server: ServerContext, body: DetokenizeRequest) -> dict:
    """The text of token ids, special tokens kept (vLLM decodes them with the tokenizer's defaults)."""
    server.check_model(body.model)
    vocab = server.llm.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is not in the vocabulary [0, {vocab})", param="tokens",
                       code="invalid_value")
    return {"prompt": server.llm.tokenizer.decode(body.tokens, skip_special_tokens=False)}


# ------------------------------------------------------------------------------------------ sampling fields
def diffusion_xargs(xargs: dict[str, Any] | None) -> int | None:
    """vLLM's DiffusionGemma request options (`vllm_xargs`, its SamplingParams.extra_args): the per-request
    step cap `diffusion_max_steps`, or None. The others have no counterpart here: refused, with why."""
    if not xargs:
        return None
    refused = {
        "diffusion_canvas_length": "letterpress denoises whole canvases of the checkpoint's canvas_length (a "
                                   "narrower canvas is not supported; max_tokens ends the output where you want)",
        "diffusion_seed_canvas": "a seeded canvas is not supported (use suffix for infilling or /v1/edits)",
        "diffusion_pinned": "pinned positions are set by suffix (infilling) and /v1/edits here",
        "diffusion_read_only": "one-step canvas reads are not supported",
        "diffusion_constrained": "token-set constraints are not supported through vllm_xargs",
    }
    for key, value in xargs.items():
        if key == "diffusion_max_steps":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ApiError(400, f"vllm_xargs.diffusion_max_steps must be a positive integer, got {value!r}",
                               param="vllm_xargs", code="invalid_value")
        elif key in refused:
            raise ApiError(400, f"vllm_xargs.{key} is not supported by letterpress: {refused[key]}",
                           param="vllm_xargs", code="unsupported")
        else:
            raise ApiError(400, f"vllm_xargs.{key} is not an option letterpress knows (it takes "
                                "diffusion_max_steps)", param="vllm_xargs", code="unsupported")
    return xargs.get("diffusion_max_steps")


def top_k(value: int | None, greedy: bool) -> int:
    """vLLM's top_k: None, 0 or -1 is off; greedy requests ignore it, as vLLM resets it at temperature 0."""
    if value is None or value in (0, -1) or greedy:
        return 0
    if value < -1:
        raise ApiError(400, f"top_k must be 0 (disable), or at least 1, got {value}", param="top_k",
                       code="invalid_value")
    return value


def stop_token_ids(ids: list[int] | None, defaults: list[int], vocab: int, ignore_eos: bool) -> list[int] | None:
    """EOS ids for the row: the checkpoint's plus the request's stop_token_ids (a committed canvas is cut at
    the first of them, finish_reason "stop", as at EOS); None when the request gives none."""
    if not ids:
        return None
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: {bad} is not in the vocabulary [0, {vocab})", param="stop_token_ids",
                       code="invalid_value")
    if ignore_eos:
        raise ApiError(400, "stop_token_ids cannot be combined with ignore_eos here: letterpress's ignore_eos "
                            "ignores every stop id (vLLM's ignores only EOS)", param="stop_token_ids",
                       code="unsupported")
    return list(dict.fromkeys([*defaults, *ids]))


# ------------------------------------------------------------------------------------ headers: id and CORS
def request_id(headers: Headers) -> str | None:
    """The client's X-Request-Id, which names the response as in vLLM (`chatcmpl-<id>`); None without one."""
    value = headers.get(REQUEST_ID_HEADER)
    if value is None:
        return None
    if not value or len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable():
        raise ApiError(400, f"the X-Request-Id header must be 1 to {MAX_REQUEST_ID_CHARS} printable characters",
                       code="invalid_value")
    return value


class RequestIdHeader:
    """Pure ASGI middleware: every response carries the request's X-Request-Id back; with `always` (vLLM's
    --enable-request-id-headers) a request without one gets a fresh uuid4 hex in its response, as in vLLM."""

    def __init__(self, app, always: bool = False):
        self.app, self.always = app, always

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        value = given if given is not None else (uuid.uuid4().hex if self.always else None)

        async def send_with_id(message):
            if value is not None and message["type"] == "http.response.start":
                MutableHeaders(raw=message.setdefault("headers", [])).append(REQUEST_ID_HEADER, value)
            await send(message)

        await self.app(scope, receive, send_with_id)


def cors_options(origins: list[str], methods: list[str], headers: list[str], credentials: bool) -> dict:
    """starlette's CORSMiddleware options from vLLM's flags (no origins: no CORS headers at all)."""
    return {"allow_origins": origins, "allow_methods": methods, "allow_headers": headers,
            "allow_credentials": credentials, "expose_headers": [REQUEST_ID_HEADER]}
