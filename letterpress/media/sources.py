"""Where media come from: PIL images, paths, bytes, `data:` URLs, `file://` URLs and http(s) URLs, each
checked at the boundary with a limit, as vLLM's media connector does.

- `data:<mime>;base64,<payload>`: decoded in memory (its decoded size counts against the byte limit).
- `http://` / `https://`: fetched with the standard library, at most `max_bytes` (the body is read in pieces
  and the fetch stops as soon as it exceeds the limit) and at most `timeout` seconds in all (a timer cuts the
  connection: a per-receive socket timeout would let a server that trickles bytes hold a fetch for ever).
- `file://` URLs (and plain paths from a server request): only under `allowed_local_media_path`, after
  resolving symlinks and `..`, as vLLM's `--allowed-local-media-path`; refused when none is set. The Python
  API and the CLI read local paths directly (the caller owns the machine).

Everything here blocks (network, disk, decoding): the server runs it on its worker threads, never on the
event loop.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RequestError

IMAGE, VIDEO = "image", "video"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


@dataclass(frozen=True)
class MediaLimits:
    """What a request may make letterpress fetch and read (vLLM's fetch timeouts: 5 s for images, 30 s
    for video, `VLLM_IMAGE_FETCH_TIMEOUT` / `VLLM_VIDEO_FETCH_TIMEOUT`)."""

    max_image_bytes: int = 20 * 2**20
    max_video_bytes: int = 200 * 2**20
    image_timeout: float = 5.0
    video_timeout: float = 30.0
    allowed_local_media_path: Path | None = None  # None: no file:// URLs
    allow_http: bool = True

    def max_bytes(self, kind: str) -> int:
        return self.max_video_bytes if kind == VIDEO else self.max_image_bytes

    def timeout(self, kind: str) -> float:
        return self.video_timeout if kind == VIDEO else self.image_timeout


def _too_big(kind: str, where: str, limit: int) -> RequestError:
    return RequestError(f"{where}: the {kind} is larger than the limit of {limit / 2**20:g} MiB")


def read_url(url: str, kind: str, limits: MediaLimits, where: str = "") -> bytes | Path:
    """The bytes of a data or http(s) URL, or the checked path of a file URL."""
    where = where or kind
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return _read_data_url(url, kind, limits, where)
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise RequestError(f"{where}: http(s) media URLs are disabled on this server")
        return _fetch(url, kind, limits, where)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{where}: file URLs must name a local path (file:///...), got host {parsed.netloc!r}")
        return local_path(urllib.parse.unquote(parsed.path), kind, limits, where)
    shown = url if len(url) <= 60 else url[:57] + "..."
    raise RequestError(f"{where}: unsupported URL {shown!r}: use a data: URL (base64), http(s):// or file://")


def _read_data_url(url: str, kind: str, limits: MediaLimits, where: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(f"{where}: a data URL must be data:<type>;base64,<data>")
    mime = header[: -len(";base64")].lower()
    if mime and not mime.startswith((f"{kind}/", "application/octet-stream")):
        raise RequestError(f"{where}: a data URL of type {mime!r} is not an {kind}")
    limit = limits.max_bytes(kind)
    if len(payload) * 3 // 4 > limit + 3:
        raise _too_big(kind, where, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data URL is not valid base64") from None
    if len(data) > limit:
        raise _too_big(kind, where, limit)
    return data


def _fetch(url: str, kind: str, limits: MediaLimits, where: str) -> bytes:
    limit, timeout = limits.max_bytes(kind), limits.timeout(kind)
    request = urllib.request.Request(url, headers={"User-Agent": "letterpress"})
    deadline = _Deadline(timeout)
    try:
        with deadline, deadline.opener().open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_big(kind, where, limit)
            body = bytearray()
            while piece := response.read1(64 * 1024):  # read1: what has arrived, not a wait for 64 KiB
                body += piece
                if len(body) > limit:
                    raise _too_big(kind, where, limit)
            if deadline.expired:  # the cut connection looks like the end of the body
                raise deadline.error(url, where)
            return bytes(body)
    except RequestError:
        raise
    except urllib.error.HTTPError as e:
        raise RequestError(f"{where}: fetching {url} failed with HTTP {e.code}") from None
    except (TimeoutError, OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        if deadline.expired:
            raise deadline.error(url, where) from None
        reason = getattr(e, "reason", e)
        raise RequestError(f"{where}: cannot fetch {url}: {reason}") from None


class _Deadline:
    """The whole fetch's time limit. A socket timeout bounds each receive, not the fetch: a server that sends
    a byte a second never trips it. So a timer shuts the fetch's connections down when the time is up, which
    ends any read (headers or body) at once."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)

    def error(self, url: str, where: str) -> RequestError:
        return RequestError(f"{where}: fetching {url} took longer than {self.seconds:g} s")

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener (proxies, redirects, TLS as urlopen), whose connections report to this deadline."""
        deadline = self

        class Watched:
            def do_open(self, connection: type[http.client.HTTPConnection], req, **kwargs):
                class Connection(connection):
                    def connect(self) -> None:
                        super().connect()
                        deadline.watch(self.sock)
                return super().do_open(Connection, req, **kwargs)

        class Http(Watched, urllib.request.HTTPHandler):
            pass

        class Https(Watched, urllib.request.HTTPSHandler):
            pass

        return urllib.request.build_opener(Http, Https)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def local_path(path: str | Path, kind: str, limits: MediaLimits, where: str) -> Path:
    """A local file a server request may read: under the allowed folder, and within the size limit."""
    root = limits.allowed_local_media_path
    if root is None:
        raise RequestError(f"{where}: local files are not allowed; start the server with "
                           "--allowed-local-media-path DIR to allow file:// URLs under DIR")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise RequestError(f"{where}: {path} is not under the allowed local media path {root}")
    return check_file(resolved, kind, limits, where)


def check_file(path: Path, kind: str, limits: MediaLimits, where: str) -> Path:
    if not path.is_file():
        raise RequestError(f"{where}: {kind} file {path} not found")
    limit = limits.max_bytes(kind)
    if path.stat().st_size > limit:
        raise _too_big(kind, where, limit)
    return path


def open_source(source: Any, kind: str, limits: MediaLimits | None, where: str) -> Any:
    """What the image or video processor can open: PIL images and arrays pass through; a URL string is read
    (`read_url`); a plain path is read when `limits` is None (Python API, CLI) and refused otherwise (a server
    request names local files as file:// URLs)."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if limits is not None:  # a server request: URLs only, local files as file:// (vLLM's rule)
            return read_url(text, kind, limits, where)
        if isinstance(source, str) and _URL.match(text):  # a scheme of 2+ letters: not a Windows drive
            return read_url(text, kind, MediaLimits(allowed_local_media_path=Path("/")), where)
        return check_file(Path(text).expanduser(), kind, MediaLimits(max_image_bytes=2**62, max_video_bytes=2**62), where)
    return source


def as_file(data: bytes | Path) -> Any:
    """bytes -> a file object (PyAV and Pillow read both)."""
    return io.BytesIO(data) if isinstance(data, bytes) else data
