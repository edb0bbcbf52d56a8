"""Media parts of chat messages, in the shapes OpenAI, vLLM and transformers send them:

- OpenAI: `{"type": "image_url", "image_url": {"url": ...}}` (or the URL as a bare string) and the Responses
  API's `{"type": "input_image", "image_url": ...}`;
- vLLM's extensions: `{"type": "video_url", "video_url": {"url": ...}}`, `{"type": "image_pil", "image_pil": img}`;
- transformers: `{"type": "image" | "video", "image" | "video" | "url" | "path": ...}`.

`split_media` takes them out of the messages (in order) and leaves a `{"type": "image"}` / `{"type": "video"}`
part in their place for the chat template, which writes the model's placeholder there (Gemma 4's templates:
`<|image|>`, `<|video|>`). For a template that ignores media parts, `flat` messages carry the placeholder as
text instead (vLLM's "string" content format does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NotSupportedError, RequestError
from .prompt import IMAGE_TOKEN
from .sources import IMAGE, VIDEO
from .video import VIDEO_TOKEN

PLACEHOLDER = {IMAGE: IMAGE_TOKEN, VIDEO: VIDEO_TOKEN}
_KEYS = {IMAGE: ("image_url", "image", "image_pil", "url", "path"), VIDEO: ("video_url", "video", "url", "path")}
_TYPES = {"image_url": IMAGE, "input_image": IMAGE, "image_pil": IMAGE, "image": IMAGE, "video_url": VIDEO,
          "video": VIDEO}
_AUDIO = ("audio_url", "input_audio", "audio")


@dataclass
class MediaPart:
    kind: str  # "image" or "video"
    source: Any  # a URL or path string, a Path, bytes, a PIL image, an array
    where: str  # for error messages: "messages[1].content[0]"


@dataclass
class SplitMessages:
    messages: list[Any]  # media parts replaced by {"type": "image" | "video"}
    flat: list[Any]  # media parts replaced by their placeholder as a text part
    parts: list[MediaPart]

    def counts(self) -> dict[str, int]:
        return {kind: sum(p.kind == kind for p in self.parts) for kind in (IMAGE, VIDEO)}


def split_media(messages: Any) -> SplitMessages:
    if not isinstance(messages, list):
        return SplitMessages(messages, messages, [])
    structured, flat, parts = [], [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(_media_kind(p) for p in content):
            structured.append(message)
            flat.append(message)
            continue
        s_content, f_content = [], []
        for j, part in enumerate(content):
            kind = _media_kind(part)
            if kind is None:
                s_content.append(part)
                f_content.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            if kind == "audio":
                raise NotSupportedError(f"{where}: this model does not take audio (DiffusionGemma has no audio encoder)")
            parts.append(MediaPart(kind, _source(part, kind, where), where))
            s_content.append({"type": kind})
            f_content.append({"type": "text", "text": PLACEHOLDER[kind]})
        structured.append({**message, "content": s_content})
        flat.append({**message, "content": f_content})
    return SplitMessages(structured, flat, parts)


def has_media(messages: Any) -> bool:
    """Whether any message holds a media (or audio) part: a quick look, before `split_media` checks them."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(_media_kind(p) for p in m["content"])
        for m in messages)


def _media_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _AUDIO:
        return "audio"
    return _TYPES.get(kind) if isinstance(kind, str) else None


def _source(part: dict, kind: str, where: str) -> Any:
    for key in (part["type"], *_KEYS[kind]):
        value = part.get(key)
        if isinstance(value, dict):  # {"url": ...}, OpenAI's shape
            value = value.get("url")
        if value is not None:
            if isinstance(value, str) and not value:
                break
            return value
    example = '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}' if kind == IMAGE else \
        '{"type": "video_url", "video_url": {"url": "https://.../clip.mp4"}}'
    raise RequestError(f"{where} is a {part['type']} part without a URL: send {example}")
