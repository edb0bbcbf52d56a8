"""`letterpress serve [MODEL]`: the OpenAI-compatible HTTP server. Its arguments and start-up live with the
server (letterpress/server/launch.py); fastapi and uvicorn load only when it runs."""

from __future__ import annotations

import argparse

HELP = "OpenAI-compatible HTTP server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..server.launch import serve_arguments

    serve_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..server.launch import run_serve

    return run_serve(args)
