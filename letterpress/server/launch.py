"""`letterpress serve [MODEL]`: arguments and start-up. fastapi and uvicorn are imported only in `run_serve`,
so the rest of the CLI does not pay for them."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal

log = logging.getLogger("letterpress.server")
DEFAULT_SERVED_NAME = "letterpress-default"


def serve_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.args import add_model_arguments

    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LETTERPRESS_API_KEY, else none)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients pass as `model` (default: MODEL, or letterpress-default)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows denoised together (cache slots), default 8")
    p.add_argument("--max-queue", type=int, default=128,
                   help="rows that may wait for a slot; beyond that requests get 429 (default 128)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens encoded per row per step, so long prompts do not stall others (default 512)")
    p.add_argument("--max-denoising-steps", type=int, default=None,
                   help="the most denoising steps per canvas a request may ask for (400 above); requests that do not "
                        "set it get the checkpoint's default capped at this (default: 1024, or the checkpoint's "
                        "default if larger)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop a request's rows this long after it was queued and answer 504 (streams: a final "
                        "error event); 0 = no limit (default 600, the openai client's own timeout)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default 2000000, text-generation-inference's --payload-limit; "
                        "with a vision tower 29962028, room for one 20 MiB image as a base64 data URL too)")
    p.add_argument("--shutdown-timeout", type=float, default=0.0,
                   help="on SIGTERM/SIGINT, refuse new requests (503) and let open ones run this many seconds "
                        "before ending them with an error; a second signal exits at once (default 0, as vLLM)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests read image/video files under DIR through file:// URLs (default: none, as vLLM)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's and uvicorn's log level (default: info, or as -v / -q say)")
    v = p.add_argument_group("vLLM's front-end options (README, \"vLLM compatibility\")")
    v.add_argument("--chat-template", default=None,
                   help="a chat template file, or the template itself, used instead of the checkpoint's")
    v.add_argument("--allowed-origins", type=json_list, default=[], metavar="JSON",
                   help='CORS: origins browsers may call from, a JSON list such as \'["http://localhost:3000"]\' '
                        "or '[\"*\"]' (default: none, no CORS headers)")
    v.add_argument("--allowed-methods", type=json_list, default=["*"], metavar="JSON",
                   help='CORS: allowed methods, a JSON list (default ["*"])')
    v.add_argument("--allowed-headers", type=json_list, default=["*"], metavar="JSON",
                   help='CORS: allowed request headers, a JSON list (default ["*"])')
    v.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")
    v.add_argument("--enable-request-id-headers", action="store_true",
                   help="give every response an X-Request-Id (a client's own is always echoed)")
    add_model_arguments(p)
    g = p.add_argument_group("sampler defaults for requests that do not set them "
                             "(default: the checkpoint's generation_config.json)")
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)


def json_list(value: str) -> list[str]:
    """vLLM's CORS flags take a JSON list of strings."""
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings such as '[\"*\"]', got {value!r}")
    return parsed


def check_arguments(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        args.parser.error(f"--port must be a TCP port, 0 to 65535 (0: any free port), got {args.port}")
    for name in ("max_num_seqs", "max_queue", "prefill_chunk"):
        value = getattr(args, name)
        if value < (0 if name == "max_queue" else 1):
            args.parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.request_timeout < float("inf"):
        args.parser.error(f"--request-timeout must be a number of seconds >= 0 (0: no limit), got {args.request_timeout}")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        args.parser.error(f"--max-request-bytes must be positive, got {args.max_request_bytes}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        args.parser.error(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")


def media_limits(args: argparse.Namespace):
    from pathlib import Path

    from ..errors import ConfigError
    from ..media.sources import MediaLimits

    folder = args.allowed_local_media_path
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"--allowed-local-media-path {folder} is not a folder")
    return MediaLimits(allowed_local_media_path=None if folder is None else Path(folder).resolve())


def check_port(host: str, port: int) -> None:
    """Bind the address once and let it go, so that a port in use fails in a second, before the model loads
    (uvicorn would only find out after loading and announcing that it serves)."""
    import socket

    from ..errors import LetterpressError

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            import errno

            why = {errno.EADDRINUSE: "another server on that port? choose another --port",
                   errno.EACCES: "ports below 1024 need root: choose a port of 1024 or above",
                   errno.EADDRNOTAVAIL: "this machine has no such address: check --host"}
            hint = why.get(e.errno, "check --host and --port")
            raise LetterpressError(f"cannot listen on {host}:{port}: {e.strerror or e} ({hint})") from None


def load_server(args: argparse.Namespace, api_key: str | None, **config: object):
    """The model and the app `letterpress serve` runs (and `letterpress run-batch` calls in-process) from the
    serve flags in `args`; `config` sets ServerConfig fields the flags do not. Returns (app, served names)."""
    from ..engine.args import attach_profiler, engine_options
    from ..engine.llm import LLM
    from ..engine.request import SamplingParams
    from .app import ServerConfig, build_app

    template = None
    if args.chat_template is not None:  # read before the model loads, so that a wrong path fails in a second
        from ..tokenizer import load_chat_template

        template = load_chat_template(args.chat_template)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, offline=True if args.offline else None,
              prefill_chunk=args.prefill_chunk, **engine_options(args))
    attach_profiler(llm, args)
    if template is not None and llm.tokenizer is not None:  # no tokenizer: OpenAIServer says so
        llm.tokenizer.set_chat_template(template)
    # Bad sampler defaults would turn every request into a 400: refuse them now (RequestError -> exit 2).
    SamplingParams(max_denoising_steps=args.max_denoising_steps, entropy_bound=args.entropy_bound, t_min=args.t_min,
                   t_max=args.t_max).resolve(llm.defaults)
    names = args.served_model_name or [args.model or DEFAULT_SERVED_NAME]
    fields = dict(served_model_names=names, api_key=api_key, max_queue=args.max_queue,
                  entropy_bound=args.entropy_bound, max_denoising_steps=args.max_denoising_steps, t_min=args.t_min,
                  t_max=args.t_max, request_timeout=args.request_timeout or None, media_limits=media_limits(args))
    if args.max_request_bytes is not None:
        fields["max_request_bytes"] = args.max_request_bytes
    return build_app(llm, ServerConfig(**{**fields, **config})), names


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, names = load_server(args, args.api_key or os.environ.get("LETTERPRESS_API_KEY"),
                             allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                             allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
                             enable_request_id_headers=args.enable_request_id_headers)
    llm, config = app.state.server.llm, app.state.server.config
    # Everything loaded so far lives as long as the process: keep it out of the garbage collector's full passes,
    # which otherwise stop every thread (the event loop too) for ~0.4 s on a 2-core machine with the model held.
    gc.collect()
    gc.freeze()
    log.info("model %s (from %s), dtype %s, device %s, max_num_seqs %d, max_model_len %d, canvas %d",
             names[0], llm.folder, llm.model.dtype, llm.model.device, args.max_num_seqs, llm.max_model_len,
             llm.runner.canvas_length)
    log.info("serving on http://%s:%d/v1 (auth: %s)", args.host, args.port, "API key" if config.api_key else "none")
    # uvicorn's own grace period only backs ours up: by then every handler has answered (or its client does
    # not read, and is cut off).
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=3)
    server = graceful_server(uvicorn.Server)(uvicorn_config, app.state.server, args.shutdown_timeout)
    server.run()
    if server.signals:  # a shutdown we finished: skip the interpreter's teardown (seconds, for a loaded model)
        import atexit
        import sys

        atexit._run_exitfuncs()  # log handlers, the profiler's trace
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0 if server.started else 1


def graceful_server(base: type) -> type:
    """uvicorn.Server with our shutdown (a subclass made here, so that uvicorn is imported only to serve).

    uvicorn alone, on SIGTERM, stops accepting connections and waits for open ones without a limit (a second
    SIGTERM does not hurry it; only a second SIGINT does). Here the first SIGTERM or SIGINT starts
    `OpenAIServer.shut_down` (503 for new requests, at most --shutdown-timeout seconds for open ones, then a
    final error event); then uvicorn closes the connections, which are idle by then. A second signal exits
    the process at once."""
    import asyncio

    class GracefulServer(base):
        def __init__(self, config, app_server, shutdown_timeout: float):
            super().__init__(config)
            self.app_server, self.shutdown_timeout = app_server, shutdown_timeout
            self.signals = 0
            self.draining = None  # the shut_down task, once started

        def handle_exit(self, sig: int, frame) -> None:  # a signal handler: no locks, no logging
            self.signals += 1
            if self.signals > 1:
                os.write(2, f"letterpress serve: second {signal.Signals(sig).name}: exiting now\n".encode())
                os._exit(128 + sig)
            # on_tick (on the event loop, within 0.1 s) starts the drain

        async def on_tick(self, counter: int) -> bool:
            if self.signals and self.draining is None:
                self.draining = asyncio.ensure_future(self.drain())
            return await super().on_tick(counter)

        async def drain(self) -> None:
            try:
                await self.app_server.shut_down(self.shutdown_timeout)
            finally:
                self.should_exit = True

    return GracefulServer
