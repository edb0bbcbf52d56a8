"""Reading a request body: a size limit, strict JSON, valid Unicode, then the pydantic schema.

Everything here runs before a request costs the engine anything. The body is read with a byte limit
(`--max-request-bytes`; 413 from Content-Length before reading, or as soon as a chunked body passes it),
then parsed on a worker thread (a multi-megabyte body takes tens of milliseconds to parse; the event loop
keeps answering meanwhile). The JSON must be JSON: Python's parser also takes `NaN`, `Infinity` and
`-Infinity`, which are not JSON, and strings holding lone UTF-16 surrogates (`"\\ud800"`), which are not
text; both are a 400 here rather than a 500 deeper down.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HttpRequest

from ..tokenizer import lone_surrogate_at
from .schemas import ApiError

# Hugging Face's text-generation-inference and text-embeddings-inference refuse bodies over 2,000,000 bytes
# (`--payload-limit`); vLLM sets no limit. 2 MB holds far more text than the default max_model_len does; a
# model that takes images gets room for one image as a data URL on top (`default_max_request_bytes`).
DEFAULT_MAX_REQUEST_BYTES = 2_000_000

Body = TypeVar("Body", bound=BaseModel)


def default_max_request_bytes(max_image_bytes: int | None) -> int:
    """2,000,000; on a model that takes images (`max_image_bytes` its image limit) also room for one image at
    the limit as a base64 data URL (4/3 of its size): OpenAI takes images of 20 MB, and a phone photo sent as a
    data URL is several MB."""
    if max_image_bytes is None:
        return DEFAULT_MAX_REQUEST_BYTES
    return DEFAULT_MAX_REQUEST_BYTES + 4 * -(-max_image_bytes // 3)


def too_large(size: int | None, limit: int, media: bool = False) -> ApiError:
    what = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    why = ("; images and video sent as data URLs count in full (base64, 4/3 of the file): send large ones as "
           "http(s) URLs, or raise --max-request-bytes") if media else ""
    return ApiError(413, f"the request body is {what}; this server accepts at most {limit:,} bytes "
                         f"(--max-request-bytes){why}", code="request_too_large")


async def read_body(raw: HttpRequest, limit: int, media: bool = False) -> bytes:
    """The whole body, or a 413 as soon as it is known to be larger than `limit` bytes. `media`: the model
    takes images, and the 413 says how data URLs count."""
    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit, media)
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:  # a chunked body (or a Content-Length that lied): stop reading now
            raise too_large(None, limit, media)
        chunks.append(chunk)
    return b"".join(chunks)


class _NotJson:
    """What Python's parser makes of NaN / Infinity / -Infinity here: a marker we then look for, to name the field."""

    def __init__(self, literal: str):
        self.literal = literal


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity literals, no lone surrogates. Raises ApiError(400)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    constants: list[_NotJson] = []
    try:
        value = json.loads(text, parse_constant=lambda literal: constants.append(_NotJson(literal)) or constants[-1])
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if constants:
        path, item = find(value, lambda item: isinstance(item, _NotJson))
        raise ApiError(400, f"'{path or 'the body'}': {item.literal} is not JSON (numbers must be finite)",
                       param=top_field(path), code="invalid_value")
    # Valid UTF-8 cannot hold a surrogate, so one can only come from a \u escape: skip the walk without one.
    if "\\ud" in text or "\\uD" in text:
        found = find(value, lambda item: isinstance(item, str) and lone_surrogate_at(item) is not None)
        if found is not None:
            path, item = found
            at = lone_surrogate_at(item)
            raise ApiError(400, f"'{path or 'the body'}' holds a lone UTF-16 surrogate (\\u{ord(item[at]):04x} at "
                                f"character {at}), which is not valid Unicode", param=top_field(path),
                           code="invalid_value")
    return value


def find(value: Any, wanted: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The first item (in document order: keys before their values) for which `wanted` holds, with its path
    such as `messages[0].content`; None when there is none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if wanted(item):
            return path, item
        if isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                child_path = f"{path}.{key}" if path else str(key)
                stack.append((child, child_path))
                stack.append((key, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None


def top_field(path: str) -> str | None:
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def parse_body(data: bytes, model: type[Body]) -> Body:
    """The body as `model`; schema errors become FastAPI's RequestValidationError (the server's 400)."""
    return validate_body(parse_json(data), model)


def validate_body(value: Any, model: type[Body]) -> Body:
    """An already parsed JSON body as `model`; schema errors become FastAPI's RequestValidationError."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
