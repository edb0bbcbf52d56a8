"""Command-line front ends for `letterpress train` and `letterpress merge-lora` (parsing and printing only).

    letterpress train --model CKPT --data train.jsonl --output runs/x [--lora] [--merge] ...
    letterpress train --config config.json --data train.jsonl --output runs/x          # from scratch
    letterpress train --recipe tiny-reverse --output runs/reverse
    torchrun --nproc-per-node 8 -m letterpress.cli train ...                           # FSDP2 over 8 GPUs
    letterpress merge-lora CKPT runs/x/adapter runs/x/merged
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", default=None, help="a named recipe (model, data and hyperparameters); flags override it")
    g.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    g.add_argument("--model", default=None, help="checkpoint folder or Hub id to fine-tune")
    g.add_argument("--config", default=None, help="config.json of a model to train from scratch")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's or the embedded one)")
    g.add_argument("--canvas-length", type=int, default=None,
                   help="train and save with this canvas length instead of the checkpoint's (no weight depends on it)")
    g = p.add_argument_group("data (JSONL: {prompt, completion} or {messages} per line)")
    g.add_argument("--data", default=None)
    g.add_argument("--eval-data", default=None)
    g.add_argument("--eval-fraction", type=float, default=None, help="hold out this fraction of --data")
    g.add_argument("--chat-template", action="store_true", default=None,
                   help="render prompt/completion lines with the chat template (one user turn, one reply)")
    g.add_argument("--max-length", type=int, default=None, help="skip examples longer than this (tokens; default: the model's max_position_embeddings)")
    g.add_argument("--output", dest="output_dir", default=None, help="output folder (default runs/letterpress)")
    g = p.add_argument_group("method")
    g.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=None)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--lora-dropout", type=float, default=None)
    g.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all linear layers)")
    g.add_argument("--merge", action="store_true", default=None, help="LoRA: also save the merged model")
    g.add_argument("--train-router", action=argparse.BooleanOptionalAction, default=None,
                   help="full fine-tuning: train the MoE routers (default: frozen for a checkpoint, "
                        "trained from scratch)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", dest="objective", choices=["base-sft", "reweighted-ce"], default=None)
    g.add_argument("--reweight-max", type=float, default=None, help="reweighted-ce: clip 1/(1-t) at this value")
    g.add_argument("--t-eps", type=float, default=None, help="t ~ U(eps, 1 - eps)")
    g.add_argument("--self-conditioning-prob", type=float, default=None)
    g.add_argument("--encoder-loss-weight", type=float, default=None, help="0 turns the encoder next-token loss off")
    g.add_argument("--diffusion-loss-weight", type=float, default=None,
                   help="0 turns the diffusion loss off (an autoregressive baseline trained by the encoder loss alone)")
    g.add_argument("--score-eos-fill", action=argparse.BooleanOptionalAction, default=None,
                   help="score the EOS that fill the last canvas (default: yes, as Google's recipe)")
    g.add_argument("--suffix-noise-share", type=float, default=None,
                   help="share of examples whose canvas keeps a prefix of the answer clean and noises the rest "
                        "(default 0: every position noised independently, as the released recipe)")
    g = p.add_argument_group("optimisation")
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--micro-batch-size", int), ("--lr", float),
                       ("--min-lr", float), ("--warmup-steps", int), ("--beta1", float), ("--beta2", float),
                       ("--adam-eps", float), ("--weight-decay", float), ("--grad-clip", float)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--tower-lr", type=float, default=None,
                   help="tiny-vlm stage 2 (--model a tiny-vlm-tower output): fine-tune the vision tower at this peak "
                        "lr on the same schedule (default: the tower stays frozen)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="parameter dtype: float32 (default), bfloat16")
    g.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for float32 parameters on GPU)")
    for flag in ("--log-every", "--eval-every", "--eval-examples", "--save-every", "--keep-checkpoints",
                 "--stop-after-steps"):
        g.add_argument(flag, type=int, default=None)
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the latest checkpoint in the output folder (default: yes)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="draw loss.png beside metrics.jsonl (default: yes; needs matplotlib)")


TRAIN_FIELDS = ("model", "tokenizer", "canvas_length", "data", "eval_data", "eval_fraction", "chat_template", "max_length",
                "output_dir", "merge", "train_router", "steps", "batch_size", "micro_batch_size", "lr", "min_lr",
                "warmup_steps", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip", "seed", "device", "dtype",
                "autocast", "log_every", "eval_every", "eval_examples", "save_every", "keep_checkpoints",
                "stop_after_steps", "resume", "progress", "plot", "tower_lr")
LOSS_FIELDS = ("objective", "reweight_max", "t_eps", "self_conditioning_prob", "encoder_loss_weight", "score_eos_fill",
               "diffusion_loss_weight", "suffix_noise_share")


def train_config_from_args(args: argparse.Namespace):
    """(TrainConfig, train data, eval data, eval hook): the recipe's settings (if any), then every flag given."""
    from ..errors import TrainError
    from .lora import LoRAConfig
    from .recipes import get_recipe
    from .trainer import TrainConfig, check_train_config

    recipe = get_recipe(args.recipe) if args.recipe else None
    cfg = recipe.config() if recipe else TrainConfig()
    overrides = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
    if args.config is not None:
        try:
            overrides["model_config"] = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainError(f"--config {args.config}: {e}") from None
        overrides.setdefault("model", None)
    cfg = replace(cfg, **overrides)
    loss = {k: getattr(args, k) for k in LOSS_FIELDS if getattr(args, k) is not None}
    if loss:
        cfg = replace(cfg, loss=replace(cfg.loss, **loss))
    lora = {k: v for k, v in (("rank", args.lora_rank), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout))
            if v is not None}
    if args.lora_targets:
        lora["target_modules"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.lora or lora:
        cfg = replace(cfg, lora=replace(cfg.lora or LoRAConfig(), **lora))
    check_train_config(cfg)
    _check_tower_lr(cfg, args.recipe)
    train_data = eval_data = None
    if recipe is not None and recipe.build_data is not None and cfg.data is None:
        from ..tokenizer import Tokenizer
        from ..embedded import ASSETS
        from ..checkpoint import resolve

        tokenizer_dir = cfg.tokenizer or (resolve(cfg.model) if cfg.model else ASSETS / "tiny_code")
        train_data, eval_data = recipe.build_data(Tokenizer.from_dir(tokenizer_dir), cfg.seed)
    return cfg, train_data, eval_data, recipe.evaluate if recipe else None


def _check_tower_lr(cfg, recipe: str | None) -> None:
    """--tower-lr only means something to tiny-vlm's own loop (no --data) with a stage-1 tower (--model)."""
    from ..errors import TrainError

    if cfg.tower_lr is None:
        return
    if recipe != "tiny-vlm" or cfg.model is None or cfg.data is not None:
        raise TrainError(f"--tower-lr {cfg.tower_lr}: only for stage 2 of tiny-vlm (--recipe tiny-vlm --model "
                         "<a tiny-vlm-tower output folder>, no --data)")
    if cfg.tower_lr < 0:
        raise TrainError(f"--tower-lr {cfg.tower_lr}: must be at least 0")


def run_train(args: argparse.Namespace) -> int:
    from .distributed import close
    from .recipes import RECIPES
    from .trainer import Trainer, finished_message, stopped_message

    if args.list_recipes:
        for name, recipe in sorted(RECIPES.items()):
            print(f"{name}: {recipe.description}")
        return 0
    cfg, train_data, eval_data, eval_hook = train_config_from_args(args)
    if args.recipe and RECIPES[args.recipe].runner is not None and cfg.data is None:
        return RECIPES[args.recipe].runner(cfg)  # a recipe with its own loop (tiny-vlm: images)
    trainer = Trainer(cfg, train_data, eval_data, eval_hook)
    env, clean = trainer.env, False
    try:
        result = trainer.train()
        clean = True
    finally:
        del trainer  # the sharded model and optimizer go before the process group (distributed.close)
        close(env, clean)
    if not env.is_main:
        return result.exit_status
    if result.already_complete:
        print(finished_message(cfg.output_dir, result.step, cfg.steps), file=sys.stderr)
        return 0
    if not result.finished:
        # 128 + the signal (130 Ctrl-C, 143 SIGTERM) when one stopped the run: the status a shell gives a process
        # that signal killed, so scripts and schedulers see an interrupted run; 0 for a --stop-after-steps box
        print(stopped_message(result.step, cfg.steps), file=sys.stderr)
        return result.exit_status
    if "eval_loss" in result.eval:
        print(f"eval loss {result.eval['eval_loss']:.4f} (diffusion {result.eval['eval_diffusion']:.4f}, "
              f"encoder {result.eval['eval_encoder']:.4f})", file=sys.stderr)
    for what, path in (("model", result.model_dir), ("LoRA adapter", result.adapter_dir)):
        if path is not None:
            print(f"saved the {what} to {path}")
    return 0


def merge_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base checkpoint folder or Hub id")
    p.add_argument("adapter", help="the LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output", help="where to write the merged checkpoint")
    p.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base's stored dtype)")
    p.add_argument("--offline", action="store_true", help="never touch the network (Hub cache only)")


def run_merge_lora(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype, offline=True if args.offline else None)
    print(f"saved the merged model to {out}")
    return 0
