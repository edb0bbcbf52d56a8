"""Images through the engine: requests carry their media, the runner computes each image's features once,
a chunked prefill never splits an image, prefix caching keys image blocks by the image's content, and media
that cannot be used are refused with a message that names them."""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("transformers")

from letterpress import LLM, SamplingParams  # noqa: E402
from letterpress.errors import NotSupportedError, RequestError  # noqa: E402

from .vision_fixtures import build_vision_checkpoint, png_bytes  # noqa: E402

PARAMS = SamplingParams(max_new_tokens=8, seed=0, max_denoising_steps=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_vision_checkpoint(tmp_path_factory.mktemp("vision_llm"))


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, max_num_seqs=2, block_size=4)


def image(seed: int, width: int = 60, height: int = 40):
    from PIL import Image

    return Image.open(io.BytesIO(png_bytes(width, height, seed)))


def ask(*media, text: str = "what is in the picture?") -> list[dict]:
    parts = [{"type": "image", "image": m} if not isinstance(m, dict) else m for m in media]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class CountingTower:
    """Wraps `llm.vision.embed_images` to count the images it embeds."""

    def __init__(self, llm):
        self.llm, self.calls = llm, 0
        self.original = llm.vision.embed_images

    def __enter__(self):
        def embed(images):
            self.calls += len(images)
            return self.original(images)
        self.llm.vision.embed_images = embed
        return self

    def __exit__(self, *exc):
        del self.llm.vision.embed_images


def test_chat_with_two_images_expands_placeholders_and_embeds_each_once(llm):
    tokens = llm.media_tokens
    with CountingTower(llm) as tower:
        out = llm.chat(ask(image(1), image(2, 40, 80)), PARAMS)[0]
    ids = out.prompt_token_ids
    assert tower.calls == 2
    assert ids.count(tokens.boi) == ids.count(tokens.eoi) == 2
    sizes = [llm.image_processor.num_soft_tokens(40, 60), llm.image_processor.num_soft_tokens(80, 40)]
    assert ids.count(tokens.image) == sum(sizes) and out.token_ids and out.finish_reason == "length"
    start = ids.index(tokens.boi)
    assert ids[start + 1:start + 1 + sizes[0]] == [tokens.image] * sizes[0] and ids[start + 1 + sizes[0]] == tokens.eoi


def test_paths_urls_and_pil_images_give_the_same_prompt_and_output(llm, tmp_path):
    import base64

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(60, 40, 5))
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    outs = [llm.chat(ask(m), PARAMS)[0] for m in (image(5), str(path), {"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "image", "path": str(path)})]
    assert all(o.prompt_token_ids == outs[0].prompt_token_ids and o.token_ids == outs[0].token_ids for o in outs)
    # vLLM's dict prompt with multi_modal_data: the same ids and tokens
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": "what is in the picture?"}]}])
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": image(5)}}, PARAMS)[0]
    assert out.prompt_token_ids[1:] == outs[0].prompt_token_ids[1:] and out.token_ids == outs[0].token_ids


def test_chunked_prefill_never_splits_an_image(folder):
    """Prefill chunks of 5 tokens would cut every image: the runner cuts before it or takes it whole, and
    the output equals one-chunk prefill's."""
    whole = LLM(folder, max_num_seqs=1, enable_prefix_caching=False).chat(ask(image(1), image(2)), PARAMS)[0]
    small = LLM(folder, max_num_seqs=1, prefill_chunk=5, enable_prefix_caching=False)
    chunks = []
    original = small.model.encode
    small.model.encode = lambda ids, *a, **k: chunks.append((ids.shape[1], k.get("soft_token_mask"))) or original(ids, *a, **k)
    out = small.chat(ask(image(1), image(2)), PARAMS)[0]
    assert out.token_ids == whole.token_ids
    with_image = [n for n, mask in chunks if mask is not None]
    assert len(with_image) == 2 and all(n > 5 for n in with_image)  # each image whole, in a chunk of its own


def test_prefix_cache_keys_image_blocks_by_content(llm):
    """Equal placeholder ids, different pixels: no block of the image is shared; the same image again is."""
    first = llm.chat(ask(image(7)), PARAMS)[0]
    same = llm.chat(ask(image(7)), PARAMS)[0]
    other = llm.chat(ask(image(8)), PARAMS)[0]
    assert first.prompt_token_ids == other.prompt_token_ids  # the ids alone cannot tell the images apart
    start = first.prompt_token_ids.index(llm.media_tokens.boi) + 1
    assert same.num_cached_tokens > start + 8 and same.token_ids == first.token_ids
    assert other.num_cached_tokens <= start  # cached up to the image at most
    # and the cached answer is the one computed from scratch
    fresh = LLM(llm.folder, enable_prefix_caching=False).chat(ask(image(8)), PARAMS)[0]
    assert other.token_ids == fresh.token_ids


def test_precomputed_soft_tokens(llm):
    pil = image(3)
    processed = llm.image_processor(pil)
    with torch.no_grad():
        (embeds,) = llm.vision.embed_images([(processed.pixel_values, processed.positions)])
    a = llm.chat(ask(pil), PARAMS)[0]
    with CountingTower(llm) as tower:
        b = llm.chat(ask({"type": "image", "image": embeds}), PARAMS)[0]
    assert tower.calls == 0 and a.token_ids == b.token_ids


def test_media_errors_name_the_part(llm, folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    cases = [
        (ask(str(bad)), RequestError, r"messages\[0\]\.content\[0\]: cannot read the image"),
        (ask(str(tmp_path / "missing.png")), RequestError, "not found"),
        (ask({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}), RequestError, "not valid base64"),
        (ask({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}), RequestError, "unsupported URL"),
        (ask({"type": "image_url", "image_url": {}}), RequestError, "without a URL"),
        (ask({"type": "input_audio", "input_audio": {}}), NotSupportedError, "audio"),
        (ask(image(1), text="two <|image|> markers"), RequestError, "2 image placeholder"),
    ]
    for messages, error, match in cases:
        with pytest.raises(error, match=match):
            llm.chat(messages, PARAMS)
    limited = LLM(folder, limit_mm_per_prompt={"image": 1})
    with pytest.raises(RequestError, match=r"At most 1 image\(s\) may be provided in one prompt, got 2"):
        limited.chat(ask(image(1), image(2)), PARAMS)
    with pytest.raises(RequestError, match="max_soft_tokens must be one of"):
        llm.chat(ask(image(1)), PARAMS, mm_processor_kwargs={"max_soft_tokens": 100})
    with pytest.raises(RequestError, match="placeholder token but no media"):
        llm.generate([2, llm.media_tokens.image, 5], PARAMS)


def test_video_longer_than_max_model_len_is_refused_before_decoding(llm, tmp_path, monkeypatch):
    from letterpress.media.video import VideoProcessor

    from .test_video import write_video

    def never(self, image):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(VideoProcessor, "frame", never)
    monkeypatch.setattr(llm, "max_model_len", 100)
    clip = write_video(tmp_path / "clip.mp4", frames=35, rate=10)  # 3 frames of ~70 soft tokens
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]: the video's 3 sampled frames .* more "
                                           "than max_model_len 100"):
        llm.chat(ask({"type": "video", "video": str(clip)}), PARAMS)


def test_video_as_decoded_frames(llm):
    """vLLM's ndarray [T, H, W, 3] (or a list of images) is a video whose frames are 1 s apart; anything else
    that is not a file says what a video may be (a PIL image was read as a file name)."""
    import numpy as np

    frames = np.stack([np.full((40, 60, 3), 40 * i, dtype=np.uint8) for i in range(3)])
    per_frame = llm.image_processor.num_soft_tokens(40, 60, 70)
    out = llm.generate({"prompt": "<|video|>What happens?", "multi_modal_data": {"video": frames}}, PARAMS)[0]
    assert out.prompt_token_ids.count(llm.media_tokens.video) == 3 * per_frame
    as_list = llm.chat(ask({"type": "video", "video": [image(1), image(2)]}), PARAMS)[0]
    assert as_list.prompt_token_ids.count(llm.media_tokens.video) == 2 * per_frame
    with pytest.raises(RequestError, match=r"cannot use a PngImageFile as a video: a video is a file, a URL, bytes"):
        llm.generate({"prompt": "<|video|>", "multi_modal_data": {"video": image(1)}}, PARAMS)
    with pytest.raises(RequestError, match=r"a video array must be \[frames, height, width, 3\] uint8"):
        llm.generate({"prompt": "<|video|>", "multi_modal_data": {"video": frames[0]}}, PARAMS)


def test_limits_of_zero_say_so(folder):
    off = LLM(folder, limit_mm_per_prompt={"image": 0, "video": 0})
    with pytest.raises(RequestError, match=r"At most 0 image\(s\) may be provided in one prompt, got 1 "
                                           r"\(limit_mm_per_prompt"):
        off.chat(ask(image(1)), PARAMS)


def test_resolution_tier_per_request(llm):
    out = llm.chat(ask(image(1, 64, 64)), PARAMS, mm_processor_kwargs={"max_soft_tokens": 140})[0]
    assert out.prompt_token_ids.count(llm.media_tokens.image) == llm.image_processor.num_soft_tokens(64, 64, 140) > 70


def test_text_only_model_refuses_images():
    with pytest.raises(NotSupportedError, match="no vision tower"):
        LLM().chat(ask(image(1)), PARAMS)


def test_block_hashes_include_image_content(llm):
    """Same ids, different image digests: the blocks before the image hash alike, every block from the
    image's first on differs (the chain carries the difference past the image)."""
    cache = llm.runner.cache
    ids = list(range(40))
    a = cache.hashes_of(ids, 40, [(9, 20, b"image-a")])
    b = cache.hashes_of(ids, 40, [(9, 20, b"image-b")])
    assert cache.block_size == 4 and a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:]))
    assert cache.hashes_of(ids, 40, [(9, 20, b"image-a")]) == a


def test_batched_conversations_equal_their_solo_runs(folder):
    """Rows with different images (and prompt lengths) in one batch: each gets exactly its solo output."""
    llm = LLM(folder, max_num_seqs=3, enable_prefix_caching=False)
    conversations = [ask(image(1)), ask(image(2, 40, 80), image(3), text="compare"), ask(text="no image")]
    batched = llm.chat(conversations, PARAMS)
    solo = [llm.chat(c, PARAMS)[0] for c in conversations]
    assert [o.token_ids for o in batched] == [o.token_ids for o in solo]
