"""The playground page served at `/`: plain HTML, CSS and JS shipped in `static/` (no CDN, no build step).

The page talks to the server only through the public API (`/v1/models`, `/v1/chat/completions` with
`denoising_preview` events, `/v1/completions` with `suffix`, `/v1/edits`), like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def install_playground(app: FastAPI) -> None:
    """GET / -> the page; GET /playground/<file> -> its stylesheet and script."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")
