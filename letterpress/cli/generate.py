"""`letterpress generate [MODEL] "prompt"`: one completion, printed canvas by canvas, then a stats line."""

from __future__ import annotations

import argparse
import sys
import time

from ..engine.args import (add_model_arguments, add_sampling_arguments, check_model_arguments, check_sampling_arguments,
                           llm_from_args, sampling_params)
from .printing import CanvasPrinter, stats_line

PLACEHOLDERS = {"image": "<|image|>", "video": "<|video|>"}


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file (or URL) for the prompt; repeat for several (README, 'Images and video')")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file for the prompt")


def media_parts(args: argparse.Namespace) -> list[dict]:
    """Chat content parts for --image / --video, media first (Google's advice for Gemma)."""
    return [{"type": "image", "image": path} for path in args.image] + [{"type": "video", "video": path} for path in args.video]


def model_for_media(model: str | None, args: argparse.Namespace) -> str | None:
    """No model named but --image / --video given: the shipped vision-language model (assets/tiny_vlm), since
    the default text model takes no images; LETTERPRESS_DEFAULT_MODEL, when set, still decides."""
    import os

    if model is not None or not (args.image or args.video) or os.environ.get("LETTERPRESS_DEFAULT_MODEL"):
        return model
    from ..embedded import shipped_models

    vlm = shipped_models().get("tiny_vlm")
    return str(vlm) if vlm is not None else None


def check_media(llm, args: argparse.Namespace) -> None:
    """Read and decode --image / --video now: a bad file is a one-line error (exit 2) before any turn."""
    from ..media.messages import MediaPart

    parts = [MediaPart("image", p, f"--image {p}") for p in args.image] + \
        [MediaPart("video", p, f"--video {p}") for p in args.video]
    if parts:
        llm.process_media(parts)


def media_prompt(prompt: str, args: argparse.Namespace) -> str | dict:
    """A plain prompt with --image / --video: vLLM's dict prompt; the text gets one placeholder per item in
    front unless it already places them itself."""
    if not args.image and not args.video:
        return prompt
    data = {"image": list(args.image), "video": list(args.video)}
    missing = "".join(PLACEHOLDERS[k] * len(v) for k, v in data.items() if prompt.count(PLACEHOLDERS[k]) == 0)
    return {"prompt": missing + prompt, "multi_modal_data": {k: v for k, v in data.items() if v}}

HELP = "complete one prompt"


def split_model_and_text(words: list[str], parser: argparse.ArgumentParser) -> tuple[str | None, str]:
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    parser.error('expected [MODEL] "prompt"')
    raise AssertionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="+", metavar='[MODEL] "prompt"',
                   help="checkpoint folder or Hub id (optional), then the prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    add_media_arguments(p)
    add_model_arguments(p)
    add_sampling_arguments(p)


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL, --dtype and the sampling flags."""
    check_model_arguments(split_model_and_text(args.words, args.parser)[0], args)
    check_sampling_arguments(args)


def run(args: argparse.Namespace) -> int:
    model, prompt = split_model_and_text(args.words, args.parser)
    llm = llm_from_args(model_for_media(model, args), args, max_num_seqs=1)
    check_media(llm, args)
    params = sampling_params(args)
    printer = CanvasPrinter(llm.tokenizer)
    start = time.perf_counter()
    if args.chat_template:
        content = [*media_parts(args), {"type": "text", "text": prompt}] if args.image or args.video else prompt
        out = llm.chat([{"role": "user", "content": content}], params, listener=printer)[0]
    else:
        out = llm.generate(media_prompt(prompt, args), params, listener=printer)[0]
    seconds = time.perf_counter() - start
    printer.check_open()
    print()
    print(stats_line(out, seconds), file=sys.stderr)
    return 0
