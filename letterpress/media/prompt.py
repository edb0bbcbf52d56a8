"""Media in a prompt: each `<|image|>` placeholder becomes `<|image>` + N × `<|image|>` + `<image|>` (N the
image's own soft-token count), each `<|video|>` becomes the video's frames (`MM:SS <|image><|video|>×n<image|>`
joined by spaces), as transformers' `Gemma4Processor` rewrites them. Every run of soft-token placeholders
becomes one `MediaRun`: where it sits, and the pixels (or precomputed soft tokens) that fill it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import RequestError
from .image import ProcessedImage
from .video import BOI_TOKEN, EOI_TOKEN, VIDEO_TOKEN, ProcessedVideo, TextEncoder

IMAGE_TOKEN = "<|image|>"


@dataclass(frozen=True)
class MediaTokens:
    """Token ids of the placeholders: from the config (`image_token_id`, `boi_token_id`, `eoi_token_id`),
    the video placeholder from the tokenizer (the config names none)."""

    image: int
    boi: int
    eoi: int
    video: int | None = None

    @property
    def soft(self) -> tuple[int, ...]:
        return (self.image,) if self.video is None else (self.image, self.video)


@dataclass
class MediaRun:
    """One image (or video frame) in a prompt: positions [start, start + length) hold its soft tokens."""

    start: int
    length: int
    pixel_values: torch.Tensor | None = None  # [P, 3·p²]
    positions: torch.Tensor | None = None  # [P, 2]
    embeds: torch.Tensor | None = None  # [length, hidden]: precomputed soft tokens, instead of pixels
    digest: bytes = field(default=b"")  # content hash: prefix-cache blocks holding this run are keyed by it

    def __post_init__(self):
        if not self.digest:
            h = hashlib.blake2b(digest_size=16)
            for t in (self.pixel_values, self.positions, self.embeds):
                if t is not None:
                    t = t.detach().cpu().contiguous()
                    h.update(str((t.dtype, tuple(t.shape))).encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self.digest = h.digest()

    @property
    def end(self) -> int:
        return self.start + self.length

    @classmethod
    def of_image(cls, start: int, image: ProcessedImage) -> "MediaRun":
        return cls(start, image.num_soft_tokens, image.pixel_values, image.positions)


def expand_prompt(ids: list[int], images: list[ProcessedImage | torch.Tensor], videos: list[ProcessedVideo],
                  tokens: MediaTokens, tokenizer: TextEncoder | None = None) -> tuple[list[int], list[MediaRun]]:
    """Replace the i-th `<|image|>` of `ids` by images[i]'s run (a `ProcessedImage`, or a [N, hidden] tensor
    of precomputed soft tokens) and the j-th `<|video|>` by videos[j]'s frames. The counts must match."""
    n_image = sum(t == tokens.image for t in ids)
    n_video = sum(t == tokens.video for t in ids) if tokens.video is not None else 0
    if n_image != len(images):
        raise RequestError(f"the prompt has {n_image} image placeholder(s) {IMAGE_TOKEN} but {len(images)} image(s) "
                           "were given")
    if n_video != len(videos):
        raise RequestError(f"the prompt has {n_video} video placeholder(s) {VIDEO_TOKEN} but {len(videos)} "
                           "video(s) were given")
    if videos and tokenizer is None:
        raise RequestError("video prompts need the model's tokenizer")
    out: list[int] = []
    runs: list[MediaRun] = []
    next_image, next_video = iter(images), iter(videos)
    for t in ids:
        if t == tokens.image:
            image = next(next_image)
            start = len(out) + 1
            if isinstance(image, torch.Tensor):
                runs.append(MediaRun(start, image.shape[0], embeds=image))
            else:
                runs.append(MediaRun.of_image(start, image))
            out += [tokens.boi] + [tokens.image] * runs[-1].length + [tokens.eoi]
        elif tokens.video is not None and t == tokens.video:
            video = next(next_video)
            segment = video.prompt_ids(tokenizer)
            frames = iter(video.frames)
            i = 0
            while i < len(segment):  # each run of video placeholders is one frame
                if segment[i] != tokens.video:
                    i += 1
                    continue
                j = i
                while j < len(segment) and segment[j] == tokens.video:
                    j += 1
                frame = next(frames, None)
                if frame is None or frame.num_soft_tokens != j - i:
                    raise RequestError(f"the tokenizer does not write {BOI_TOKEN}{VIDEO_TOKEN}…{EOI_TOKEN} as "
                                       "single tokens: this model does not take video")
                runs.append(MediaRun.of_image(len(out) + i, frame))
                i = j
            out += segment
        else:
            out.append(t)
    return out, runs
