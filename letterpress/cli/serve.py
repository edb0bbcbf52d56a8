"""`letterpress serve [MODEL]`: the OpenAI-compatible HTTP server. Its arguments and start-up live with the
server (letterpress/server/launch.py); fastapi and uvicorn load only when it runs."""

from __future__ import annotations

import argparse
import logging

HELP = "OpenAI-compatible HTTP server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..server.launch import serve_arguments

    serve_arguments(p)
    p.set_defaults(log_level=None)  # --log-level when given, else what -v / -q chose


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main, which runs it before `run`): the server's flags, the port (bound once and let
    go), MODEL, --dtype and the sampler defaults."""
    from ..engine.args import check_model_arguments, check_sampling_arguments
    from ..server.launch import check_arguments, check_port

    check_arguments(args)
    check_port(args.host, args.port)
    check_model_arguments(args.model, args)
    check_sampling_arguments(args)


def run(args: argparse.Namespace) -> int:
    from ..server.launch import run_serve

    if args.log_level is None:
        args.log_level = logging.getLevelName(logging.getLogger("letterpress").getEffectiveLevel()).lower()
    else:
        logging.getLogger("letterpress").setLevel(args.log_level.upper())
    return run_serve(args)
