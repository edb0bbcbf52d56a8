"""`letterpress train`: fine-tune (full or LoRA) or train from scratch; arguments and running live in
letterpress/train/command.py."""

from __future__ import annotations

import argparse

HELP = "fine-tune (full or LoRA) or train a model on JSONL data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.command import train_arguments

    train_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..train.command import run_train

    return run_train(args)
