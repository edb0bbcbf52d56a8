"""Images and video through the OpenAI API: a real openai client against a real server on loopback, serving a
tiny random checkpoint with a vision tower. The answers are random; the plumbing is what is tested: media parts
read from data, http(s) and file URLs, features computed once per image, soft tokens counted in usage, and
every unusable medium a 400 that says which part and why, with the event loop free meanwhile."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

from letterpress import LLM  # noqa: E402
from letterpress.errors import RequestError  # noqa: E402
from letterpress.media.sources import MediaLimits, read_url  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402
from letterpress.server.body import default_max_request_bytes  # noqa: E402

from .live_server import KEY, MODEL, LiveServer  # noqa: E402
from .test_video import write_video  # noqa: E402
from .test_vision_engine import CountingTower  # noqa: E402
from .vision_fixtures import build_vision_checkpoint, png_bytes  # noqa: E402

PNG = png_bytes(60, 40, 1)
SLOW_S = 3.0
TRICKLE_S = 30.0  # how long /trickle.png keeps sending, a byte every 0.1 s


class MediaHost:
    """An http server on loopback: /ok.png, /big.png (over the limit), /slow.png (answers after SLOW_S),
    /trickle.png (200 without Content-Length, then a byte every 0.1 s for TRICKLE_S)."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/trickle.png":
                    self.trickle()
                    return
                if self.path == "/slow.png":
                    time.sleep(SLOW_S)
                body = b"\0" * (3 * 2**20) if self.path == "/big.png" else PNG
                if self.path == "/missing.png":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def trickle(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                end = time.monotonic() + TRICKLE_S
                try:
                    while time.monotonic() < end:
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:  # the client hung up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "a.png").write_bytes(PNG)
    write_video(folder / "clip.mp4", frames=25, rate=10)  # 2.5 s -> 2 frames at 1 fps
    (folder / "broken.mp4").write_bytes(b"\0" * 1000)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_dir):
    folder = build_vision_checkpoint(tmp_path_factory.mktemp("vision_server"))
    llm = LLM(folder, max_num_seqs=4, limit_mm_per_prompt={"image": 2, "video": 1})
    llm.defaults.max_denoising_steps = 2
    limits = MediaLimits(max_image_bytes=2**20, image_timeout=1.0, allowed_local_media_path=media_dir)
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY, media_limits=limits))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def host():
    return MediaHost()


def data_url(data: bytes = PNG, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(client, *parts, **kw):
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=0, **kw)


def test_image_url_features_and_usage(client, server):
    llm = server.app.state.server.llm
    n = llm.image_processor.num_soft_tokens(40, 60)
    text_only = chat(client).usage.prompt_tokens
    with CountingTower(llm) as tower:
        reply = chat(client, image_part(data_url()))
    assert tower.calls == 1 and reply.choices[0].message.content is not None
    assert reply.usage.prompt_tokens == text_only + n + 2  # <|image> + N soft tokens + <image|>, for <|image|>
    # the tier as vLLM's per-request mm_processor_kwargs
    big = chat(client, image_part(data_url()), extra_body={"mm_processor_kwargs": {"max_soft_tokens": 140}})
    assert big.usage.prompt_tokens == text_only + llm.image_processor.num_soft_tokens(40, 60, 140) + 2


def test_http_file_and_video_urls(client, server, host, media_dir):
    llm = server.app.state.server.llm
    base = chat(client, image_part(data_url()))
    for url in (f"{host.url}/ok.png", f"file://{media_dir / 'a.png'}"):
        reply = chat(client, image_part(url))
        assert reply.usage.prompt_tokens == base.usage.prompt_tokens
        assert reply.choices[0].message.content == base.choices[0].message.content
    with CountingTower(llm) as tower:
        video = chat(client, {"type": "video_url", "video_url": {"url": f"file://{media_dir / 'clip.mp4'}"}})
    assert tower.calls == 2  # two frames, each embedded once
    assert video.usage.prompt_tokens > chat(client).usage.prompt_tokens + 2 * 48


@pytest.mark.parametrize("part,message", [
    (image_part(data_url(b"not an image")), "messages[0].content[0]: cannot read the image"),
    (image_part("data:image/png;base64,@@@"), "not valid base64"),
    (image_part(data_url(mime="text/plain")), "is not an image"),
    (image_part(data_url(b"\0" * (2**20 + 10))), "messages[0].content[0]: the image is larger than the limit of 1 MiB"),
    (image_part(data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")),
     "messages[0].content[0]: cannot read the image: not an image Pillow can read (PNG, JPEG"),
    (image_part(data_url(b"")), "not an image Pillow can read"),
    (image_part("ftp://example.com/a.png"), "unsupported URL"),
    (image_part("file:///etc/passwd"), "not under the allowed local media path"),
    (image_part("/etc/passwd"), "unsupported URL"),
    ({"type": "image_url", "image_url": {}}, "without a URL"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "does not take audio"),
    ({"type": "video_url", "video_url": {"url": "file://MEDIA/broken.mp4"}}, "cannot read the video"),
])
def test_unusable_media_are_400s(client, media_dir, part, message):
    if part.get("type") == "video_url":
        part = {"type": "video_url", "video_url": {"url": part["video_url"]["url"].replace("MEDIA", str(media_dir))}}
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, part)
    assert message in str(error.value)
    assert str(error.value).count("messages[0].content[0]") == 1 and " at 0x" not in str(error.value)


def test_fetch_limits_and_counts(client, host, server):
    for path, message in (("/big.png", "larger than the limit"), ("/missing.png", "HTTP 404")):
        with pytest.raises(openai.BadRequestError, match=message):
            chat(client, image_part(host.url + path))
    with pytest.raises(openai.BadRequestError, match=r"At most 2 image\(s\) may be provided in one prompt, got 3"):
        chat(client, *[image_part(data_url())] * 3)
    with pytest.raises(openai.BadRequestError, match="max_soft_tokens must be one of"):
        chat(client, image_part(data_url()), extra_body={"mm_processor_kwargs": {"max_soft_tokens": 99}})


def test_slow_fetch_times_out_without_stalling_the_event_loop(server, host):
    """The fetch runs on a worker thread: /health answers while it waits, then the request gets its 400."""
    result = {}

    def slow():
        result["r"] = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": MODEL, "max_tokens": 8, "messages": [
                                     {"role": "user", "content": [image_part(host.url + "/slow.png")]}]}, timeout=60)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and thread.is_alive()  # answered while the fetch was still waiting
    thread.join(60)
    assert result["r"].status_code == 400 and "/slow.png" in result["r"].json()["error"]["message"]


def test_fetch_deadline_holds_for_a_trickling_server(host):
    """A socket timeout bounds each receive; the deadline bounds the fetch, even at a byte per 0.1 s."""
    start = time.monotonic()
    with pytest.raises(RequestError, match=r"trickle.png took longer than 0.5 s"):
        read_url(host.url + "/trickle.png", "image", MediaLimits(image_timeout=0.5), "messages[0].content[0]")
    assert time.monotonic() - start < 2.0  # not TRICKLE_S


def test_text_requests_do_not_wait_behind_media_fetches(server, host, monkeypatch):
    """Two trickling image URLs in flight: a text-only chat is answered meanwhile, and each media request gets
    its 400 at the fetch deadline."""
    state = server.app.state.server
    monkeypatch.setattr(state.config, "media_limits", dataclasses.replace(state.config.media_limits, image_timeout=4.0))
    headers = {"Authorization": f"Bearer {KEY}"}
    results, threads = [], []

    def trickling():
        start = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "max_tokens": 8, "messages": [
                {"role": "user", "content": [image_part(host.url + "/trickle.png")]}]})
        results.append((r, time.monotonic() - start))

    for _ in range(2):
        threads.append(threading.Thread(target=trickling))
        threads[-1].start()
    time.sleep(0.5)  # both fetches under way
    text = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, json={
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
    assert text.status_code == 200 and all(t.is_alive() for t in threads)  # answered while both still fetch
    for t in threads:
        t.join(60)
    for r, elapsed in results:
        assert r.status_code == 400 and "took longer than 4 s" in r.json()["error"]["message"]
        assert elapsed < 4.0 + 3.0  # the deadline plus slack, not TRICKLE_S


def noise_png(side: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_default_body_limit_holds_data_urls(client, server):
    """A vision checkpoint's default --max-request-bytes holds an image at the limit as a data URL (the text
    default, 2,000,000, refused phone photos of 1.5 MB+); past it, the 413 says how data URLs count."""
    assert default_max_request_bytes(20 * 2**20) == 29_962_028 and default_max_request_bytes(None) == 2_000_000
    limit = server.app.state.server.config.max_request_bytes
    assert limit == 2_000_000 + 4 * -(-2**20 // 3)  # this server's image limit is 1 MiB
    images = [noise_png(540, seed) for seed in (1, 2)]  # two of ~0.85 MiB: a body of ~2.4 MB
    assert all(len(image) < 2**20 for image in images)
    reply = chat(client, *[image_part(data_url(image)) for image in images])
    assert reply.choices[0].finish_reason is not None
    r = httpx.post(server.url + "/v1/chat/completions", content=b" " * (limit + 1), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "data URLs count in full" in r.json()["error"]["message"]


def test_tokenize_counts_image_soft_tokens_as_chat_does(client, server):
    # vLLM's /tokenize (server/vllm_compat.py) runs the chat route's media path: the same ids, soft tokens included
    import httpx

    messages = [{"role": "user", "content": [image_part(data_url()), {"type": "text", "text": "What is this?"}]}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages, "mm_processor_kwargs": {"max_soft_tokens": 140}},
                   headers={"Authorization": f"Bearer {KEY}"})
    reply = chat(client, image_part(data_url()), extra_body={"mm_processor_kwargs": {"max_soft_tokens": 140}})
    assert r.status_code == 200 and r.json()["count"] == reply.usage.prompt_tokens
