"""`letterpress run-batch -i IN.jsonl -o OUT.jsonl [--model MODEL]`: a file of OpenAI Batch API requests
(`vllm run-batch`'s format and flags) answered by the server's routes in-process, no port opened; the engine
batches the requests in flight. Format and behaviour: letterpress/server/batch.py."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

HELP = "answer a JSONL file of OpenAI Batch API requests (as vllm run-batch), no server needed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.args import add_model_arguments

    p.add_argument("-i", "--input-file", required=True,
                   help="JSONL, one {custom_id, method, url, body} request per line ('-': standard input; an "
                        "http(s) URL is downloaded)")
    p.add_argument("-o", "--output-file", required=True,
                   help="JSONL, one {id, custom_id, response, error} line per request, in input order "
                        "('-': standard output; an http(s) URL is uploaded with PUT when the batch ends)")
    p.add_argument("--output-tmp-dir", default=None, metavar="DIR",
                   help="where the answers are written before an http(s) --output-file is uploaded with PUT "
                        "(default: the system's temporary folder)")
    p.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the embedded model)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) a request's `model` may give (default: --model, or letterpress-default)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows denoised together (cache slots), default 8")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="requests submitted to the engine at once (default: 4 x --max-num-seqs)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens encoded per row per step (default 512)")
    p.add_argument("--max-denoising-steps", type=int, default=None,
                   help="the most denoising steps per canvas a request may ask for (as serve's flag)")
    p.add_argument("--chat-template", default=None,
                   help="a chat template file, or the template itself, used instead of the checkpoint's")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests read image/video files under DIR through file:// URLs (default: none)")
    add_model_arguments(p)
    g = p.add_argument_group("sampler defaults for requests that do not set them "
                             "(default: the checkpoint's generation_config.json)")
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)
    # the server's HTTP-only settings, fixed for a batch: no time limit; --max-inflight bounds the requests queued
    # (max_queue only has to hold their rows), and a line's body may be any size (vLLM sets no limit either)
    p.set_defaults(max_queue=1_000_000, request_timeout=0, max_request_bytes=sys.maxsize)


def check(args: argparse.Namespace) -> None:
    """Before torch loads: the flags, the output path, and every line's envelope (read_batch), so that a
    malformed file fails at once with its line number; stdin is read here and kept for `run`."""
    from pathlib import Path

    from ..engine.args import check_model_arguments, check_sampling_arguments
    from ..errors import LetterpressError
    from ..server.batch import read_batch

    for name in ("max_num_seqs", "max_inflight", "prefill_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            args.parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.max_inflight = args.max_inflight or 4 * args.max_num_seqs
    check_model_arguments(args.model, args)
    check_sampling_arguments(args)
    if args.output_tmp_dir is not None and not Path(args.output_tmp_dir).is_dir():
        raise LetterpressError(f"--output-tmp-dir {args.output_tmp_dir} is not a folder")
    if args.output_file != "-" and not is_url(args.output_file):
        out = Path(args.output_file)
        if out.is_dir():
            raise LetterpressError(f"--output-file {out} is a folder")
        if not out.resolve().parent.is_dir():
            raise LetterpressError(f"--output-file {out}: its folder {out.resolve().parent} does not exist")
        local_input = args.input_file != "-" and not is_url(args.input_file)
        if local_input and out.exists() and Path(args.input_file).exists() and out.samefile(args.input_file):
            raise LetterpressError("--input-file and --output-file are the same file: the answers would "
                                   "overwrite the requests")
    # A regular file is read twice (checked here, streamed later); standard input, a pipe or a FIFO can be read
    # only once, so it is read whole here and kept. UTF-8 whatever the locale; a byte-order mark is skipped.
    args.input_lines = None
    try:
        if is_url(args.input_file):
            raw = download(args.input_file)
        elif args.input_file == "-":
            raw = sys.stdin.buffer.read()
        elif not os.path.isfile(args.input_file):
            with open(args.input_file, "rb") as f:
                raw = f.read()
        else:
            raw = None
        if raw is not None:
            args.input_lines = raw.decode("utf-8-sig").split("\n")
            args.request_count = sum(1 for _ in read_batch(args.input_lines))
        else:
            with open(args.input_file, encoding="utf-8-sig", newline="\n") as f:
                args.request_count = sum(1 for _ in read_batch(f))
    except OSError as e:
        raise LetterpressError(f"cannot read --input-file {args.input_file}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise LetterpressError(f"--input-file {args.input_file} is not UTF-8 text") from None
    if args.request_count == 0:
        raise LetterpressError(f"--input-file {args.input_file} holds no requests")


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def download(url: str) -> bytes:
    """GET `url` (vLLM's run-batch reads an input URL the same way); a failure is one LetterpressError."""
    import urllib.error
    import urllib.request

    from ..errors import LetterpressError

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise LetterpressError(f"cannot read --input-file {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LetterpressError(f"cannot read --input-file {url}: {getattr(e, 'reason', e)}") from None


def upload(path: str, url: str) -> None:
    """PUT the file at `path` to `url` (a presigned object-store URL, as vLLM's run-batch uploads its output)."""
    import urllib.request

    with open(path, "rb") as f:
        data = f.read()
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/jsonl", "Content-Length": str(len(data))})
    with urllib.request.urlopen(request, timeout=300):
        pass


def output_bytes(out: dict) -> bytes:
    """One output line in UTF-8; a string that is not valid Unicode (a lone surrogate, which JSON's \\u escapes
    can carry in) is written escaped rather than failing the line."""
    try:
        return (json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(out) + "\n").encode("ascii")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from ..errors import LetterpressError
    from ..server.batch import read_batch, run_batch
    from ..server.launch import load_server
    from .printing import progress as progress_report
    from .printing import silence_stdout

    if not args.verbose:  # a line per request and response is the server's log, not a batch's (-v shows it)
        logging.getLogger("letterpress.server").setLevel(logging.WARNING)
    app, _ = load_server(args, api_key=None)
    totals = {"ok": 0, "failed": 0, "completion_tokens": 0, "canvases": 0, "steps": 0}

    def count(out: dict) -> None:
        body = out["response"]["body"]
        if body is None:
            totals["failed"] += 1
        else:
            totals["ok"] += 1
            usage = body.get("usage") or {}
            totals["completion_tokens"] += usage.get("completion_tokens", 0)
            extra = usage.get("letterpress") or {}
            totals["canvases"] += extra.get("canvases", 0)
            totals["steps"] += extra.get("denoising_steps", 0)
        progress.update()

    with contextlib.ExitStack() as stack:
        if args.input_lines is not None:
            lines = read_batch(args.input_lines)
        else:
            lines = read_batch(stack.enter_context(open(args.input_file, encoding="utf-8-sig", newline="\n")))
        local = args.output_file  # an http(s) output is written here first and uploaded when the batch ends
        if is_url(args.output_file):
            fd, local = tempfile.mkstemp(prefix="letterpress-batch-", suffix=".jsonl", dir=args.output_tmp_dir)
            os.close(fd)
        sink = sys.stdout.buffer if local == "-" else stack.enter_context(
            open(local, "wb", buffering=0))  # unbuffered: a failed write leaves nothing to flush at close

        def write(out: dict) -> None:  # a line at a time: an interrupted batch keeps the answers written so far
            data = memoryview(output_bytes(out))
            while data:  # an unbuffered file may take part of it (a disk filling up)
                data = data[sink.write(data):]
            sink.flush()

        progress = stack.enter_context(progress_report(args.request_count, "Running batch", "requests"))
        start = time.perf_counter()
        try:
            asyncio.run(run_batch(app, lines, write, args.max_inflight, count))
        except OSError as e:  # the output could not be written (a full disk, a closed pipe)
            if local == "-":
                silence_stdout()
            raise LetterpressError(f"cannot write --output-file {local}: {e.strerror or e}; "
                                   f"{totals['ok'] + totals['failed']} answer(s) finished, the lines written "
                                   "before this are kept") from None
        except KeyboardInterrupt:
            if local != args.output_file:  # nothing was uploaded: say where the answers so far are
                print(f"the answers finished before the interrupt are in {local} (not uploaded)", file=sys.stderr)
            raise
        seconds = time.perf_counter() - start
    if local != args.output_file:
        try:
            upload(local, args.output_file)
        except Exception as e:  # urllib's HTTPError, URLError, timeouts: the answers stay on disk
            raise LetterpressError(f"cannot upload the answers to --output-file {args.output_file} "
                                   f"({getattr(e, 'reason', None) or e}); they are kept in {local}") from None
        os.remove(local)
    where = "standard output" if args.output_file == "-" else os.fspath(args.output_file)
    print(f"[{totals['ok']} answered, {totals['failed']} failed -> {where}; {totals['completion_tokens']} "
          f"completion tokens in {seconds:.1f} s ({totals['completion_tokens'] / max(seconds, 1e-9):.1f} tokens/s), "
          f"{totals['canvases']} canvas(es), {totals['steps']} denoising steps, "
          f"{totals['completion_tokens'] / max(totals['steps'], 1):.2f} tokens/forward]", file=sys.stderr)
    return 0
