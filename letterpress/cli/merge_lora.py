"""`letterpress merge-lora CKPT ADAPTER OUT`: fold a LoRA adapter into its base checkpoint
(letterpress/train/command.py)."""

from __future__ import annotations

import argparse

HELP = "fold a LoRA adapter into its base checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.command import merge_lora_arguments

    merge_lora_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..train.command import run_merge_lora

    return run_merge_lora(args)
