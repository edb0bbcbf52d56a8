"""Video in, as Gemma 4 takes it: frames sampled at 1 fps (at most 32), each frame an image at the video
tier (70 soft tokens), and a prompt that writes every frame as `MM:SS <|image><|video|>×n<image|>`, joined
by spaces (transformers' `Gemma4Processor.replace_video_token`; vLLM writes the same).

Sampling: n = max(1, ⌊frames / source fps × fps⌋) frames at indices ⌊i · frames / n⌋, which is transformers'
`default_sample_indices_fn` with `fps`; above the cap it is the same rule with n = 32, i.e. Gemma 4's
video processor default (`num_frames=32`, uniform over the whole clip) and vLLM's loader default. A frame's
timestamp is its index / the source fps (24 when the container does not say, as transformers assumes).

Decoding uses PyAV (`pip install letterpress[video]`), imported only when a video is read.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import numpy as np

from ..config import VIDEO_TIER
from ..errors import NotSupportedError, RequestError
from .image import ImageProcessor, ProcessedImage, check_pixels, check_tier

BOI_TOKEN, VIDEO_TOKEN, EOI_TOKEN = "<|image>", "<|video|>", "<image|>"
VIDEO_TOKEN_ID = 258884  # in the released tokenizer; `<|image>` is 255999 and `<image|>` 258882
DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 32
FALLBACK_SOURCE_FPS = 24.0


class TextEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


def sample_indices(total_frames: int, source_fps: float, fps: float = DEFAULT_FPS,
                   max_frames: int = DEFAULT_MAX_FRAMES) -> list[int]:
    """Indices of the frames to keep: `fps` per second of video, at most `max_frames`, evenly spread."""
    if total_frames < 1:
        raise RequestError("the video has no frames")
    if fps <= 0 or max_frames < 1:
        raise RequestError(f"video sampling needs fps > 0 and max_frames >= 1 (got {fps}, {max_frames})")
    n = min(max(1, int(total_frames / source_fps * fps)), max_frames, total_frames)
    return [i * total_frames // n for i in range(n)]


def timestamp(seconds: float) -> str:
    """`MM:SS`, seconds truncated (transformers' format)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_prompt(timestamps: list[float], soft_tokens_per_frame: int) -> str:
    """The text that stands for a video in a prompt (it replaces the template's one `<|video|>`)."""
    frame = f"{BOI_TOKEN}{VIDEO_TOKEN * soft_tokens_per_frame}{EOI_TOKEN}"
    return " ".join(f"{timestamp(t)} {frame}" for t in timestamps)


@dataclass
class VideoFrames:
    """Decoded, sampled frames (PIL RGB images, or what `read_video`'s `convert` made of them) and where they
    come from."""

    frames: list[Any]
    indices: list[int]
    source_fps: float
    total_frames: int

    @property
    def timestamps(self) -> list[float]:
        return [i / self.source_fps for i in self.indices]


def _av():
    try:
        import av
    except ImportError:
        raise NotSupportedError("video needs PyAV: pip install 'letterpress[video]' (or pip install av)") from None
    return av


def decoded_video(frames: Any, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES) -> VideoFrames:
    """Frames the caller decoded: an array [frames, height, width, 3] uint8 (vLLM's), or a list of PIL images or
    [height, width, 3] arrays. They are taken as a clip of `fps` frames a second (frame i at i / fps seconds)
    and sampled as a file's frames are (at most `max_frames`, evenly spread)."""
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8):
        raise RequestError(f"a video array must be [frames, height, width, 3] uint8, got {list(frames.shape)} "
                           f"{frames.dtype}")
    frames = list(frames)
    indices = sample_indices(len(frames), fps, fps, max_frames)
    return VideoFrames([frames[i] for i in indices], indices, fps, len(frames))


def read_video(source: str | Path | BinaryIO, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
               convert: Callable[[Any], Any] | None = None,
               check: Callable[[int, int, int], None] | None = None) -> VideoFrames:
    """Decode the first video stream of a file and keep the sampled frames. `check(frames, height, width)`
    runs once the frames to keep are known and before any is decoded (it raises to refuse the video);
    `convert(frame)` runs on each kept frame as it is decoded, so that one full-size frame is held at a time,
    not 32. Frames over MAX_PIXELS are refused (Pillow's own limit never sees decoded video)."""
    av = _av()
    try:
        container = av.open(source if hasattr(source, "read") else str(source))  # a path or a file object
    except FileNotFoundError:
        raise RequestError(f"video file {source} not found") from None
    except Exception as e:  # av raises its own error types (InvalidDataError, ...)
        raise RequestError(f"cannot read the video: {e}") from None
    with container:
        if not container.streams.video:
            raise RequestError("the file has no video stream")
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate) if stream.average_rate else FALLBACK_SOURCE_FPS
        height, width = stream.codec_context.height, stream.codec_context.width
        check_pixels(width, height, "a video frame")
        try:
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # some containers omit the count
            if not stream.frames:
                container.seek(0)
            indices = sample_indices(total, source_fps, fps, max_frames)
            if check is not None and height > 0 and width > 0:
                check(len(indices), height, width)
            wanted, frames = set(indices), []
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    check_pixels(frame.width, frame.height, "a video frame")  # a stream may change size midway
                    image = frame.to_image()  # RGB (rgb24), as transformers decodes with PyAV
                    frames.append(convert(image) if convert is not None else image)
                if i >= indices[-1]:
                    break
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(f"cannot decode the video: {e}") from None
    if len(frames) < len(indices):  # the stream held fewer frames than its header said
        indices = indices[:len(frames)]
        if not frames:
            raise RequestError("the video has no decodable frames")
    return VideoFrames(frames, indices, source_fps, total)


@dataclass
class ProcessedVideo:
    frames: list[ProcessedImage]  # one per sampled frame, each at the video tier
    timestamps: list[float]  # seconds

    @property
    def soft_tokens_per_frame(self) -> int:
        return self.frames[0].num_soft_tokens

    @property
    def prompt(self) -> str:
        return video_prompt(self.timestamps, self.soft_tokens_per_frame)

    def prompt_ids(self, tokenizer: TextEncoder) -> list[int]:
        """The prompt's token ids. Encoding the joined text (not concatenating pieces) is what makes them equal
        to transformers': the text between frames, " MM:SS ", is one segment for the tokenizer."""
        for token in (BOI_TOKEN, VIDEO_TOKEN, EOI_TOKEN):
            if tokenizer.token_to_id(token) is None:
                raise NotSupportedError(f"the tokenizer has no {token} token: this model does not take video")
        return tokenizer.encode(self.prompt, add_special_tokens=False)


class VideoProcessor:
    """Video files (or already decoded frames) -> `ProcessedVideo`."""

    def __init__(self, image_processor: ImageProcessor | None = None, fps: float = DEFAULT_FPS,
                 max_frames: int = DEFAULT_MAX_FRAMES, soft_tokens: int = VIDEO_TIER):
        self.image_processor = image_processor or ImageProcessor()
        self.fps, self.max_frames, self.soft_tokens = fps, max_frames, check_tier(soft_tokens)

    def __call__(self, source: str | Path | BinaryIO | VideoFrames, max_tokens: int | None = None) -> ProcessedVideo:
        """`max_tokens` (max_model_len): refuse, before decoding, a video whose sampled frames alone take more."""
        if isinstance(source, (np.ndarray, list, tuple)):  # frames decoded by the caller (vLLM takes an array)
            source = decoded_video(source, self.fps, self.max_frames)
        if isinstance(source, VideoFrames):
            frames = [self.image_processor(frame, soft_tokens=self.soft_tokens) for frame in source.frames]
            return ProcessedVideo(frames, source.timestamps)
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        if not isinstance(source, (str, Path)) and not hasattr(source, "read"):
            raise RequestError(f"cannot use a {type(source).__name__} as a video: a video is a file, a URL, bytes, "
                               "or its frames ([frames, height, width, 3] uint8 array, or a list of images)")
        video = read_video(source, self.fps, self.max_frames, convert=self.frame,
                           check=None if max_tokens is None else functools.partial(self.check_length, max_tokens))
        return ProcessedVideo(video.frames, video.timestamps)

    def frame(self, image: Any) -> ProcessedImage:
        return self.image_processor(image, soft_tokens=self.soft_tokens)

    def check_length(self, max_tokens: int, frames: int, height: int, width: int) -> None:
        per_frame = self.image_processor.num_soft_tokens(height, width, self.soft_tokens) + 2  # + <|image>, <image|>
        if frames * per_frame > max_tokens:
            raise RequestError(f"the video's {frames} sampled frames ({width}×{height}) take at least "
                               f"{frames * per_frame:,} tokens, more than max_model_len {max_tokens}")
