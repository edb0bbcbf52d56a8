"""Video frame sampling and the prompt layout against transformers 5.23's code: frames and indices from its
`read_video_pyav` + `default_sample_indices_fn`, prompt text from `Gemma4Processor.replace_video_token`
(called on a stand-in processor: the full Gemma4Processor needs torchvision for its video processor), and
ids from a transformers tokenizer over the same tokenizer.json."""

from __future__ import annotations

import shutil
import weakref
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from letterpress.embedded import ASSETS
from letterpress.errors import NotSupportedError, RequestError
from letterpress.media.image import ImageProcessor
from letterpress.media.video import (BOI_TOKEN, EOI_TOKEN, VIDEO_TOKEN, VideoProcessor, read_video, sample_indices,
                                     timestamp, video_prompt)
from letterpress.tokenizer import Tokenizer

av = pytest.importorskip("av")
pytest.importorskip("PIL")


def write_video(path, frames: int, rate: int, width: int = 64, height: int = 48):
    """An MPEG-4 clip whose frame i is a flat grey of level 4·i (so a decoded frame tells its index)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), 4 * i % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {"short": write_video(folder / "short.mp4", frames=35, rate=10),  # 3.5 s -> 3 frames at 1 fps
            "long": write_video(folder / "long.mp4", frames=80, rate=2, width=32, height=32)}  # 40 s -> capped at 32


def reference_read(path, **sampling):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    return read_video_pyav(str(path), sample_indices_fn=partial(default_sample_indices_fn, **sampling))


@pytest.mark.parametrize("clip, sampling", [("short", {"fps": 1}), ("long", {"num_frames": 32})])
def test_frames_equal_transformers_pyav_reader(clips, clip, sampling):
    """1 fps below the cap is transformers' fps sampling; above it, its num_frames=32 default."""
    pytest.importorskip("transformers")
    frames, metadata = reference_read(clips[clip], **sampling)
    ours = read_video(clips[clip])
    assert ours.indices == list(metadata.frames_indices)
    assert ours.total_frames == metadata.total_num_frames and ours.source_fps == metadata.fps
    assert ours.timestamps == metadata.timestamps
    assert len(ours.frames) == len(frames)
    for image, expected in zip(ours.frames, frames):
        assert np.array_equal(np.asarray(image), expected)
    # the decoded frames are the sampled ones (grey level 4·index, up to codec error)
    levels = [float(np.asarray(f).mean()) for f in ours.frames]
    assert all(abs(level - 4 * i % 256) < 6 for level, i in zip(levels, ours.indices))


def test_sampling_rule():
    assert sample_indices(35, 10.0) == [0, 11, 23]
    assert len(sample_indices(80, 2.0)) == 32 and sample_indices(80, 2.0)[:3] == [0, 2, 5]
    assert sample_indices(3, 30.0) == [0]  # shorter than a second: one frame
    assert sample_indices(10, 1.0, fps=2.0) == list(range(10))  # never more frames than the clip has
    assert sample_indices(600, 10.0, max_frames=8) == [i * 75 for i in range(8)]
    assert [timestamp(s) for s in (0, 59.99, 61.5, 3600)] == ["00:00", "00:59", "01:01", "60:00"]
    with pytest.raises(RequestError):
        sample_indices(0, 10.0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The shipped tiny tokenizer plus Gemma 4's image/video special tokens."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    folder = tmp_path_factory.mktemp("tok")
    backend = Backend.from_file(str(ASSETS / "tiny_code" / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOI_TOKEN, VIDEO_TOKEN, EOI_TOKEN)])
    backend.save(str(folder / "tokenizer.json"))
    shutil.copyfile(ASSETS / "tiny_code" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.mark.parametrize("clip", ["short", "long"])
def test_prompt_ids_equal_gemma4_processor(clips, tokenizer_dir, clip):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    video = VideoProcessor()(clips[clip])
    n = video.soft_tokens_per_frame
    # transformers' video token count per frame: the image rule at the video tier (70)
    assert n == Gemma4Processor._get_num_multimodal_tokens(
        SimpleNamespace(_merge_kwargs=lambda **_: {"images_kwargs": {}, "videos_kwargs": {}},
                        image_processor=Gemma4ImageProcessorPil(),
                        video_processor=SimpleNamespace(patch_size=16, pooling_kernel_size=3, max_soft_tokens=70)),
        video_sizes=[(1, 48 if clip == "short" else 32, 64 if clip == "short" else 32)])["num_video_tokens"][0]
    frames, metadata = reference_read(clips[clip], **({"fps": 1} if clip == "short" else {"num_frames": 32}))
    stand_in = SimpleNamespace(boi_token=BOI_TOKEN, eoi_token=EOI_TOKEN, video_token=VIDEO_TOKEN)
    expected_text = Gemma4Processor.replace_video_token(
        stand_in, {"num_soft_tokens_per_video": [n], "video_metadata": [metadata]}, 0)
    assert video.prompt == expected_text
    reference_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    expected_ids = reference_tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    ours = Tokenizer.from_dir(tokenizer_dir)
    ids = video.prompt_ids(ours)
    assert ids == expected_ids
    video_id = ours.token_to_id(VIDEO_TOKEN)
    assert ids.count(video_id) == n * len(video.frames)
    # each frame is the image path at tier 70, exactly as the image processor gives it
    reference_image = Gemma4ImageProcessorPil()
    for processed, frame in zip(video.frames[:2], frames[:2]):
        expected = reference_image(frame, max_soft_tokens=70, return_tensors="pt")
        assert processed.num_soft_tokens == n == int(expected["num_soft_tokens_per_image"][0])
        k = processed.pixel_values.shape[0]
        assert torch.equal(processed.pixel_values, expected["pixel_values"][0, :k])
        assert torch.equal(processed.positions, expected["image_position_ids"][0, :k])


def test_prompt_layout_and_errors(tmp_path, clips):
    text = video_prompt([0.0, 1.5, 75.2], 2)
    assert text == ("00:00 <|image><|video|><|video|><image|> 00:01 <|image><|video|><|video|><image|> "
                    "01:15 <|image><|video|><|video|><image|>")
    with pytest.raises(NotSupportedError, match="video"):
        VideoProcessor()(clips["short"]).prompt_ids(Tokenizer.from_dir(ASSETS / "tiny_code"))
    with pytest.raises(RequestError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(RequestError, match="cannot"):
        read_video(tmp_path / "bad.mp4")
    with pytest.raises(RequestError, match="tier"):
        VideoProcessor(soft_tokens=64)
    # per-call choices: another rate, another cap, another tier
    video = VideoProcessor(ImageProcessor(), fps=2.0, max_frames=4, soft_tokens=140)(clips["short"])
    assert len(video.frames) == 4 and video.timestamps == [0.0, 0.8, 1.7, 2.6]
    assert video.soft_tokens_per_frame > 70


def test_container_without_a_frame_count(tmp_path):
    """Matroska headers carry no frame count (transformers' reader then sees 0 frames); we count packets."""
    path = write_video(tmp_path / "clip.mkv", frames=35, rate=10)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    video = read_video(path)
    assert video.indices == [0, 11, 23] and video.total_frames == 35 and len(video.frames) == 3
    assert all(abs(float(np.asarray(f).mean()) - 4 * i) < 6 for f, i in zip(video.frames, video.indices))


def test_frames_are_processed_as_decoded(clips, monkeypatch):
    """Each kept frame goes through the image processor before the next is decoded: one full-size frame is
    held at a time, not 32 (an 8K clip held ~5 GB of frames before resizing)."""
    seen, peak, original = [], [], VideoProcessor.frame

    def frame(self, image):
        seen.append(weakref.ref(image))
        peak.append(sum(ref() is not None for ref in seen))  # full-size frames still held
        return original(self, image)

    monkeypatch.setattr(VideoProcessor, "frame", frame)
    video = VideoProcessor()(clips["long"])
    assert len(video.frames) == 32 and max(peak) == 1
    assert all(f.num_soft_tokens == video.soft_tokens_per_frame for f in video.frames)


def test_too_long_or_too_large_video_is_refused_before_decoding(clips, monkeypatch):
    def never(self, image):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(VideoProcessor, "frame", never)
    processor = VideoProcessor()
    per_frame = processor.image_processor.num_soft_tokens(32, 32, 70) + 2
    with pytest.raises(RequestError, match=rf"32 sampled frames \(32×32\) take at least {32 * per_frame:,} tokens, "
                                           "more than max_model_len 1000"):
        processor(clips["long"], max_tokens=1000)
    import letterpress.media.image as image_module

    monkeypatch.setattr(image_module, "MAX_PIXELS", 1000)  # the 50-megapixel cap, scaled down
    with pytest.raises(RequestError, match="a video frame is 32×32 pixels .* more than the limit"):
        processor(clips["long"])
