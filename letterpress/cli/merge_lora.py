"""`letterpress merge-lora CKPT ADAPTER OUT`: fold a LoRA adapter into its base checkpoint
(letterpress/train/command.py)."""

from __future__ import annotations

import argparse

HELP = "fold a LoRA adapter into its base checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.command import merge_lora_arguments

    merge_lora_arguments(p)


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL is a folder or a Hub id, --dtype a known one, OUTPUT a folder that
    may be replaced (the adapter is read, and checked, after)."""
    from pathlib import Path

    from ..model_ref import check_dtype_name, check_replaceable, is_local_folder

    is_local_folder(args.model)
    if args.dtype is not None:
        check_dtype_name(args.dtype)
    check_replaceable(Path(args.output))


def run(args: argparse.Namespace) -> int:
    from ..train.command import run_merge_lora

    return run_merge_lora(args)
