"""OpenAI request bodies as pydantic models, and the response shapes as plain dicts.

Validation is strict on purpose: a wrong type is a 400, an unknown field is a 400, and a field OpenAI has but
letterpress does not implement (logprobs, functions, ...) is a 400 that names it. Nothing is silently ignored.
Our extensions (`entropy_bound`, `max_denoising_steps`, `t_min`, `t_max`, vLLM's `ignore_eos`,
`infill_strategy` beside `suffix`, and `rule_mask` on completions) are top-level fields; with the `openai` client pass them through
`extra_body`. `POST /v1/edits` (`EditRequest`) is ours: OpenAI retired its edits endpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None  # a last chunk with `usage` (and `choices: []`)
    include_obfuscation: bool | None = None  # accepted for compatibility: we never pad chunks
    denoising_preview: bool | None = None  # letterpress: `event: denoising_preview` after every denoising step


class _Sampler(BaseModel):
    """Sampler fields shared by every generating endpoint (completions, chat, edits). Numbers must be finite
    (`NaN` / `Infinity`, which Python's JSON parser accepts, are refused); the engine checks the ranges it
    can honour (SamplingParams.validate) and the server its `--max-denoising-steps` ceiling."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None  # None = the served model
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = Field(1, ge=1)  # null: 1, as OpenAI's spec and vLLM allow
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None  # only logged

    # letterpress extensions: override the sampler settings for this request
    entropy_bound: float | None = Field(None, gt=0)
    max_denoising_steps: int | None = Field(None, ge=1)
    t_min: float | None = Field(None, ge=0)
    t_max: float | None = Field(None, gt=0)

    # vLLM's (server/vllm_compat.py): top_k per position (None / 0 / -1: off); its DiffusionGemma options
    top_k: int | None = None
    vllm_xargs: dict[str, Any] | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _null_n(cls, value: Any) -> Any:
        return 1 if value is None else value


class _Common(_Sampler):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    ignore_eos: bool = False  # as in vLLM: keep going past EOS until max_tokens (benchmarks, tests)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False  # null: false, as OpenAI's spec and vLLM allow
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: more EOS ids (server/vllm_compat.py)
    skip_special_tokens: bool | None = None  # vLLM's: false keeps special tokens in the text (default true)
    # structured output (server/structured.py): vLLM's {json | regex | choice | json_object} and OpenAI's
    # response_format {"type": "json_object" | "json_schema" | "text"}
    structured_outputs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    # OpenAI fields that we refuse unless they hold their no-op value (see UNSUPPORTED)
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return False if value is None else value

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would stop before the first character

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wants_preview(self) -> bool:
        return bool(self.stream_options and self.stream_options.denoising_preview)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None  # infilling: the completion is the text between prompt and suffix
    infill_strategy: Literal["search", "slack"] | None = None  # letterpress: see README, "Infilling and editing"
    # letterpress: solve the prompt's Sudoku with the rule-mask search (server/sudoku.py; README, "Sudoku")
    rule_mask: Literal["sudoku"] | None = None
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None


class EditRequest(_Sampler):
    """letterpress's `POST /v1/edits`: rewrite character spans of `input`, keep every other character."""

    input: str
    spans: list[list[int]]  # [[start, end), ...] character offsets into `input`; checked by letterpress.infill
    instruction: str | None = None  # put in the context before the text
    slack_tokens: int = Field(0, ge=0)  # extra free positions after each span (longer replacements)


class ChatCompletionRequest(_Common):
    messages: list[Any]  # checked message by message by the tokenizer; media parts by letterpress.media
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # checked by the tokenizer; rendered by the chat template
    tool_choice: str | dict[str, Any] | None = None  # "auto" / "none"; "required" / named: 400 (server/chat.py)
    parallel_tool_calls: bool | None = None  # false: only the first call is returned
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": true}
    include_reasoning: bool = True  # vLLM's: false leaves the thoughts out of the answer
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM's: {"max_soft_tokens": 70|140|280|560|1120}


# field -> (values that mean "off", why we refuse anything else)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "logprobs": ((None, False), "log-probabilities are not supported yet"),
    "top_logprobs": ((None, 0), "log-probabilities are not supported yet"),
    "functions": ((None, []), "the deprecated functions API is not supported: use tools"),
    "function_call": ((None, "none"), "the deprecated function_call is not supported: use tool_choice"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "best_of": ((None, 1), "best_of > 1 is not supported"),
    "top_p": ((None, 1.0), "top_p is not supported: the denoiser samples full distributions (use temperature)"),
    "presence_penalty": ((None, 0.0), "presence_penalty is not supported"),
    "frequency_penalty": ((None, 0.0), "frequency_penalty is not supported"),
}

# completions' logprobs is a count, and 0 asks for the sampled token's log-probability: only null is off there
COMPLETION_OFF: dict[str, tuple] = {"logprobs": (None,)}


class ApiError(Exception):
    """An error with its HTTP status, rendered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def refuse_unsupported(body: _Common) -> None:
    """Raise a 400 naming the first OpenAI feature the request turns on that letterpress lacks."""
    for name, (off, why) in UNSUPPORTED.items():
        if isinstance(body, CompletionRequest):
            off = COMPLETION_OFF.get(name, off)
        if hasattr(body, name) and getattr(body, name) not in off:
            raise ApiError(400, f"'{name}' is not supported by letterpress: {why}", param=name, code="unsupported")


# ----------------------------------------------------------------------------------------------- responses
def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(name: str, root: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "letterpress", "root": root,
            "max_model_len": max_model_len}


def usage(prompt_tokens: int, completion_tokens: int, stats: dict) -> dict:
    """OpenAI's usage plus `letterpress`: canvases, denoising steps and tokens per forward (see README)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "letterpress": stats}
