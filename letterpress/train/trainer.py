"""`letterpress train`: full fine-tuning or LoRA of a DiffusionGemma checkpoint, or training one from scratch.

One optimiser step = `batch_size` examples over all ranks, run as micro-batches of `micro_batch_size` per rank
(gradient accumulation). The step's examples, and every random draw of their loss, are a pure function of
(seed, step): see data.py and loss.py. Losses are normalised by the scored positions of the whole global
batch, so any split into micro-batches or ranks computes the same update.

Output folder:
    checkpoints/step-0000100/   resume state (model + optimizer via torch.distributed.checkpoint, scheduler,
                                RNG states, step); written to a temporary folder and renamed; every
                                `save_every` steps, where a run stops early (time box, SIGTERM, Ctrl-C) and at
                                the last step (so that more `steps` can continue a finished run)
    metrics.jsonl               one line per logged step and per evaluation
    loss.png                    training and held-out loss and the learning rate against the step (letterpress/
                                plots.py), redrawn at most every PLOT_EVERY_SECONDS, at each evaluation and at the end
    model/                      the trained model in the released format (config.json, model.safetensors,
                                generation_config.json, tokenizer files): full fine-tuning, or LoRA with merge
    adapter/                    LoRA only: adapter_config.json + adapter_model.safetensors (PEFT format)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import checkpoint_dtype, parse_dtype, resolve, save_model
from ..config import model_config_from_dict
from ..embedded import ASSETS
from ..errors import TrainError
from ..model import DiffusionGemma
from ..tokenizer import Tokenizer
from . import distributed as D
from .data import DataFormat, ExampleOrder, TokenizedDataset, example_generator, read_jsonl
from .lora import LoRAConfig, apply_lora, merge_lora_state, refuse_quantized, save_adapter, upcast_adapters
from .merge import TOKENIZER_FILES
from .loss import LossConfig, LossModule, LossSums, make_batch, total_loss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PLOT_EVERY_SECONDS = 30.0  # loss.png redraws (~0.2 s each) stay a negligible share of a run


@dataclass
class TrainConfig:
    # what to train: a checkpoint folder / Hub id, or a config dict (config.json contents) from scratch
    model: str | None = None
    model_config: dict | None = None
    tokenizer: str | None = None  # tokenizer folder; default: the checkpoint's, or the embedded tiny_code one
    # Train (and save) with this canvas length instead of the checkpoint's: no weight depends on it, and a small
    # model writes more coherent text with a shorter canvas (block diffusion's quality falls as blocks grow).
    canvas_length: int | None = None
    init_std: float = 0.02  # from scratch: weights ~ N(0, init_std)
    # data
    data: str | None = None  # JSONL; or pass datasets to Trainer directly (recipes do)
    eval_data: str | None = None
    eval_fraction: float = 0.0  # hold out this fraction of `data` when there is no eval_data
    chat_template: bool = False  # render prompt/completion lines as one user turn + one assistant turn
    max_length: int | None = None  # skip longer examples (prompt + target + EOS)
    output_dir: str = "runs/letterpress"
    # method
    lora: LoRAConfig | None = None  # None: full fine-tuning
    train_router: bool | None = None  # None: frozen when fine-tuning a checkpoint (as AutoModel), trained from scratch
    loss: LossConfig = field(default_factory=LossConfig)  # canvas_length and eos_id come from the model/tokenizer
    # optimisation (defaults: the reference page's Sudoku LoRA recipe)
    steps: int = 2000
    batch_size: int = 16  # examples per optimiser step, all ranks together
    micro_batch_size: int | None = None  # examples per forward per rank; None: batch_size / world size
    lr: float = 1.5e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 100
    beta1: float = 0.95
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4  # on matrices only (not norms, scales)
    grad_clip: float = 1.0  # 0: no clipping
    # tiny-vlm stage 2 only (--model a tiny-vlm-tower output): the vision tower's peak lr, on the same warmup +
    # cosine schedule (min lr scaled by min_lr / lr); None or 0: the tower stays frozen
    tower_lr: float | None = None
    # run
    seed: int = 0
    device: str | None = None  # None: cuda when available
    dtype: str = "float32"  # parameter dtype
    autocast: bool | None = None  # bf16 autocast; None: on for float32 parameters on GPU
    log_every: int = 10
    eval_every: int = 0  # steps; 0: only at the end (when there is held-out data)
    eval_examples: int = 512  # at most this many held-out examples per evaluation
    save_every: int = 0  # steps between resume checkpoints; 0: none
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir/checkpoints
    merge: bool = False  # LoRA: also write the merged model to output_dir/model
    progress: bool = True
    plot: bool = True  # draw loss.png beside metrics.jsonl (matplotlib is imported only when this is on)
    stop_after_steps: int | None = None  # leave (with a checkpoint) after this many steps of this invocation


@dataclass
class StepStats:
    loss: float
    diffusion: float
    encoder: float
    grad_norm: float
    lr: float
    loss_tokens: int  # positions with a loss term: scored canvas positions (diffusion) + next-token targets (encoder)
    forward_tokens: int  # non-padding positions read by the step's forward passes (see `forward_tokens`)
    seconds: float


def window_means(window: list[StepStats]) -> dict[str, float]:
    """One metrics line for the steps since the last one: per-step means (a single step's loss is noisy: t is
    random per example), the learning rate of the last step, and how many steps were averaged."""
    means = {name: sum(getattr(st, name) for st in window) / len(window)
             for name in ("loss", "diffusion", "encoder", "grad_norm", "loss_tokens", "forward_tokens", "seconds")}
    return {**means, "lr": window[-1].lr, "steps_averaged": len(window)}


def forward_tokens(batch, cfg: LossConfig) -> int:
    """Non-padding token positions that `loss_sums` runs through the model for `batch`, once per pass: the
    encoder over the context (prompt + earlier canvases) and the decoder over the canvas when the diffusion
    loss is on (the canvas twice when self-conditioning is on: its first pass runs for every row), and the
    encoder over prompt + target when the encoder loss is on. A pass that is off reads nothing."""
    n = 0
    if cfg.diffusion_loss_weight:
        decoder_passes = 2 if cfg.self_conditioning_prob > 0 else 1
        n += int(batch.context_lengths.sum()) + decoder_passes * batch.clean.numel()
    if cfg.encoder_loss_weight:
        n += int(batch.sequence_lengths.sum())
    return n


@dataclass
class TrainResult:
    step: int
    finished: bool  # every step trained and the model (or adapter) written
    last: StepStats | None
    eval: dict[str, float]
    model_dir: Path | None
    adapter_dir: Path | None
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run early
    already_complete: bool = False  # the output folder held a finished run at `step` >= steps: nothing was done

    @property
    def exit_status(self) -> int:
        """The process's exit status: StopSignals' for the signal that stopped the run, else 0."""
        return StopSignals.status(self.stopped_by)


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) as a request to stop at the next step boundary, so that a training loop can
    write its resume checkpoint before it leaves. A context manager: inside it the first signal only sets
    `signum` (and says so on stderr when `announce`); a second one restores the previous handlers and
    delivers the signal to them (Ctrl-C twice: KeyboardInterrupt at once; SIGTERM twice: the default, death).
    On leaving, the previous handlers are back. Handlers can only be installed in the main thread: elsewhere
    (a Trainer used from a worker thread) this does nothing and signals keep their old meaning.

        with StopSignals() as signals:
            while step < steps:
                ...one step...
                if signals.agreed(env):  # every rank stops at the same step (a collective under torchrun)
                    break
            save_resume_checkpoint()
        if signals.signum:
            print(f"stopped at step {step} of {steps}; run the same command again to resume", file=sys.stderr)
            return signals.exit_status
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)  # in this order of precedence when ranks got different ones

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not None:  # None: a handler set outside Python, which could not be put back
                    self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        """The exit status for the signal that asked to stop (`status`)."""
        return self.status(self.signum)

    @staticmethod
    def status(signum: int | None) -> int:
        """128 + the signal (130 for SIGINT, 143 for SIGTERM: what a shell reports for a process the signal
        killed), or 0 for no signal: the one rule for a stopped run's exit status (TrainResult uses it too)."""
        return 128 + signum if signum is not None else 0

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop waiting for the step to end
            handler = self._previous.get(signum, signal.SIG_DFL)
            self.restore()
            if callable(handler):
                handler(signum, frame)
            else:
                signal.raise_signal(signum)  # SIG_DFL: the default action; SIG_IGN: nothing
            return
        self.signum = signum
        if self.announce:  # os.write: no buffered stream is re-entered from a handler
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to write a resume checkpoint "
                        f"(send it again to stop at once)\n".encode())

    def agreed(self, env: D.DistEnv) -> int | None:
        """The signal every rank stops for, or None. Ranks may see a signal at different moments (torchrun
        forwards it to each worker in turn), so under torchrun this is a collective that every rank must call
        at the same point of the loop; then all ranks leave after the same step and save one checkpoint."""
        if not env.distributed:
            return self.signum
        counts = D.all_reduce_sum([float(self.signum == sig) for sig in self.SIGNALS], env)
        return next((int(sig) for sig, n in zip(self.SIGNALS, counts) if n), None)


EvalHook = Callable[["Trainer"], dict[str, float]]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(params: list[torch.nn.Parameter], cfg: TrainConfig,
                        own_lr: tuple[tuple[list[torch.nn.Parameter], float], ...] = ()
                        ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only (not norms, scales, biases), and `lr_factor`'s warmup + cosine
    schedule from cfg.lr down to cfg.min_lr at cfg.steps. `own_lr`: (parameters not in `params`, peak lr) pairs
    whose groups follow the same schedule from their own peak (their min lr scaled by the same ratio); their
    groups come after those of `params`."""
    groups = []
    for subset, lr in ((params, cfg.lr), *own_lr):
        groups += [{"params": [p for p in subset if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in subset if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps)
    ratio = cfg.min_lr / cfg.lr if cfg.lr else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, ratio))
    return optimizer, scheduler


def follow_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                    peak_lrs: list[float]) -> None:
    """After a resume checkpoint is loaded: this run's schedule, not the stored one's. The peak lr of each group
    (`peak_lrs`: what this run's settings gave the fresh scheduler) replaces the stored `base_lrs` and
    `initial_lr`, which are those of the run that wrote the checkpoint (so a changed --lr would otherwise be
    ignored), and the lr of the step about to run comes from this run's schedule (a run continued with more
    `steps` follows the new total's cosine from its first step on)."""
    scheduler.base_lrs = list(peak_lrs)
    lrs = [peak * factor(scheduler.last_epoch) for peak, factor in zip(peak_lrs, scheduler.lr_lambdas)]
    for group, peak, lr in zip(optimizer.param_groups, peak_lrs, lrs):
        group["initial_lr"], group["lr"] = peak, lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (and the step's metrics line logs)


def schedule_settings(cfg: TrainConfig, tower: bool = False) -> dict[str, float]:
    """The settings that set the learning rates' peaks and floor, as a checkpoint records them."""
    return {"lr": cfg.lr, "min_lr": cfg.min_lr, **({"tower_lr": cfg.tower_lr} if tower else {})}


def schedule_change(stored: dict[str, float], now: dict[str, float], step: int) -> str | None:
    """One line for a resume whose learning rates differ from the checkpoint's (`stored`: its
    `schedule_settings`, or what its scheduler's peaks show for a checkpoint written before they were recorded);
    None when none changed."""
    changed = [f"--{k.replace('_', '-')} {stored[k]:g} -> {now[k]:g}" for k in now
               if stored.get(k) is not None and now[k] is not None and stored[k] != now[k]]
    if not changed:
        return None
    return (f"learning rate changed since the checkpoint ({', '.join(changed)}): from step {step} on the run follows "
            f"this command's schedule")


def stopped_message(step: int, steps: int) -> str:
    return f"stopped at step {step} of {steps}; run the same command again to resume"


def finished_message(output_dir: str | Path, step: int, steps: int) -> str:
    return (f"{output_dir} holds a finished run (step {step} of {steps}): nothing to do; raise --steps to train on "
            f"from its last checkpoint, or --no-resume to start over")


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse step counts, batch sizes, learning rates and settings no run can use, before anything is built or
    written: the CLI runs it on its flags (the recipes with their own loop, tiny-vlm and tiny-vlm-tower, read
    these too) and `Trainer` on a TrainConfig made in Python. Messages name the CLI flag."""
    at_least = {"steps": 1, "batch_size": 1, "micro_batch_size": 1, "warmup_steps": 0, "lr": 0, "min_lr": 0,
                "eval_examples": 1, "log_every": 1}
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < low):
            raise TrainError(f"--{name.replace('_', '-')} {value!r}: must be a number at least {low}")
    for name in ("lr", "min_lr", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip", "tower_lr"):
        value = getattr(cfg, name, None)
        if value is not None and not math.isfinite(value):  # nan stops AdamW with a traceback; inf trains to nan
            raise TrainError(f"--{name.replace('_', '-')} {value}: must be a finite number")
    if cfg.eval_fraction is not None and not 0 <= cfg.eval_fraction < 1:
        raise TrainError(f"--eval-fraction {cfg.eval_fraction}: must be in [0, 1)")
    if cfg.lora is not None and not isinstance(cfg.lora, LoRAConfig):
        raise TrainError(f"lora must be a LoRAConfig (or None for full fine-tuning), got {cfg.lora!r}")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise TrainError(f"--output {cfg.output_dir} is a file: the run needs a folder to write into")


class Trainer:
    def __init__(self, config: TrainConfig, train_data: TokenizedDataset | None = None,
                 eval_data: TokenizedDataset | None = None, eval_hook: EvalHook | None = None):
        """`eval_hook(trainer) -> metrics` runs on every rank at each evaluation, after the held-out loss (e.g. a
        recipe's generation accuracy); its metrics are logged with the others."""
        check_train_config(config)
        self.cfg = cfg = config
        self.eval_hook = eval_hook
        self.env = D.init_distributed(cfg.device)
        # Our draws use their own generators; the global RNG only drives dropout (LoRA dropout). Seed it so that
        # runs repeat, per rank so that ranks differ; checkpoints save and restore it.
        torch.manual_seed(cfg.seed + self.env.rank)
        self.out = Path(cfg.output_dir)
        # loss.png: time of the last draw, metrics.jsonl's size then, whether a failure was reported
        self._last_plot, self._plotted_size, self._plot_warned = -math.inf, -1, False
        self._load_sources()
        self.model_config = model_config_from_dict(self.config_dict)
        self.dtype = self._parse_dtype()
        self.train_data, self.eval_data = self._load_data(train_data, eval_data)
        self.micro = self._micro_batch_size()
        if self.vocab_size < self.tokenizer.vocab_size:
            raise TrainError(f"the tokenizer ({self.tokenizer_dir}) has {self.tokenizer.vocab_size} ids but the "
                             f"model's vocabulary only {self.vocab_size}")
        self.loss_cfg = replace(cfg.loss, canvas_length=self.model_config.canvas_length, eos_id=self._eos_id())
        self.module = self._build_module()
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not self.trainable:
            raise TrainError("nothing to train: every parameter is frozen")
        self.optimizer, self.scheduler = adamw_with_schedule(self.trainable, cfg)
        self._peak_lrs = list(self.scheduler.base_lrs)  # this run's, whatever a resumed checkpoint stored
        self.order = ExampleOrder(len(self.train_data), cfg.seed)
        self.step = 0
        self._resumed_state: dict[str, Any] = {}  # trainer_state.json of the checkpoint resumed from

    # ------------------------------------------------------------------------------------------------- set-up
    def _parse_dtype(self) -> torch.dtype:
        """--dtype; "auto" is the base checkpoint's own dtype, as where a checkpoint is loaded for inference."""
        if self.cfg.dtype != "auto":
            return parse_dtype(self.cfg.dtype)
        if self.base_dir is None:
            raise TrainError("--dtype auto means the checkpoint's own dtype, and a model trained from scratch has "
                             "none: pass float32 or bfloat16")
        return parse_dtype("auto", auto=checkpoint_dtype(self.base_dir, self.model_config))

    def _load_sources(self) -> None:
        cfg = self.cfg
        if cfg.model is None and cfg.model_config is None:
            raise TrainError("give a checkpoint to fine-tune (--model) or a config to train from scratch (--config)")
        self.base_dir = resolve(cfg.model) if cfg.model is not None else None
        if self.base_dir is not None:
            self.config_dict = json.loads((self.base_dir / "config.json").read_text())
            refuse_quantized(self.base_dir, self.config_dict, "training")
            gen_file = self.base_dir / "generation_config.json"
            self.generation_config = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        else:
            self.config_dict = dict(cfg.model_config)
            self.generation_config = None
        if cfg.canvas_length is not None:
            if not isinstance(cfg.canvas_length, int) or cfg.canvas_length < 1:
                raise TrainError(f"canvas_length must be a positive integer, got {cfg.canvas_length!r}")
            self.config_dict = {**self.config_dict, "canvas_length": cfg.canvas_length}
        tokenizer_dir = cfg.tokenizer or self.base_dir or ASSETS / "tiny_code"
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.model_config.text.eos_token_id[0]

    def _load_data(self, train: TokenizedDataset | None, held_out: TokenizedDataset | None):
        cfg = self.cfg
        # Unset, the model's positions bound an example (TRL truncates at its max_length): a longer one would
        # train positions the model never learned, and slowly (an 8,232-token example took 108 s a step here).
        max_length = cfg.max_length if cfg.max_length is not None else self.model_config.text.max_position_embeddings
        fmt = DataFormat(chat_template=cfg.chat_template, max_length=max_length)
        if cfg.eval_data is not None and cfg.eval_fraction > 0:
            log.warning("--eval-fraction %s is ignored: --eval-data gives the held-out examples", cfg.eval_fraction)
        if train is None:
            if cfg.data is None:
                raise TrainError("no training data: pass --data FILE.jsonl (or a recipe)")
            train = read_jsonl(cfg.data, self.tokenizer, fmt)
        if held_out is None and cfg.eval_data is not None:
            held_out = read_jsonl(cfg.eval_data, self.tokenizer, fmt)
        elif held_out is None and cfg.eval_fraction > 0:
            train, held_out = train.split(cfg.eval_fraction, cfg.seed)
        return train, held_out

    def _micro_batch_size(self) -> int:
        cfg, world = self.cfg, self.env.world_size
        if cfg.batch_size % world:
            raise TrainError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
        micro = cfg.micro_batch_size or cfg.batch_size // world
        if (cfg.batch_size // world) % micro:
            raise TrainError(f"batch size {cfg.batch_size} / {world} processes is not a multiple of the micro-batch "
                             f"size {micro}")
        return micro

    def _base_model(self) -> DiffusionGemma:
        """The starting weights on CPU (rank 0 only when distributed), trainable flags set."""
        if self.base_dir is not None:
            model = DiffusionGemma.from_pretrained(self.base_dir, dtype=self.dtype)
        else:
            model = DiffusionGemma(self.model_config).to(self.dtype)
            model.init_weights(self.cfg.init_std, torch.Generator().manual_seed(self.cfg.seed))
        self._set_trainable(model, torch.Generator().manual_seed(self.cfg.seed + 1))
        return model

    def _set_trainable(self, model: DiffusionGemma, generator: torch.Generator | None) -> None:
        if self.cfg.lora is not None:
            apply_lora(model, self.cfg.lora, generator)
            return
        model.requires_grad_(True)
        train_router = self.cfg.train_router if self.cfg.train_router is not None else self.base_dir is None
        if not train_router:
            for layer in model.layers:
                layer.router.requires_grad_(False)

    def _build_module(self) -> LossModule:
        env = self.env
        if not env.distributed:
            model = self._base_model()
            # FSDP2 shards one dtype per group, so a sharded run keeps its adapters in the model's dtype
            upcast_adapters(model)
            return LossModule(model.to(env.device), self.loss_cfg)
        # Rank 0 reads the weights; every rank builds an empty replica on `meta`, shards it and receives its shard.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {f"model.{k}": v for k, v in self._base_model().state_dict().items()} if env.is_main else {}
        with torch.device("meta"):
            replica = DiffusionGemma(self.model_config).to(self.dtype)
        self._set_trainable(replica, None)
        module = D.shard_model(LossModule(replica, self.loss_cfg), replica.layers, env)
        module.to_empty(device=env.device)
        replica.init_rope()
        set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return module

    def _autocast(self):
        use = self.cfg.autocast
        if use is None:
            use = self.env.device.type == "cuda" and self.dtype == torch.float32
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16) if use else nullcontext()

    # ----------------------------------------------------------------------------------------------- batches
    @property
    def vocab_size(self) -> int:
        return self.model_config.text.vocab_size

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches of global step `step`: positions [step*G + rank*L, ... + L) of the stream."""
        per_rank = self.cfg.batch_size // self.env.world_size
        first = step * self.cfg.batch_size + self.env.rank * per_rank
        positions = list(range(first, first + per_rank))
        if self.micro < per_rank:
            # Micro-batches of similar length: each is padded to its own longest context, so a long prompt (tool
            # declarations) no longer pads every short one. The step's examples, their draws (one generator per
            # position) and the globally normalised loss are the same in any grouping.
            positions.sort(key=lambda p: int(self.train_data.total_lens[self.order(p)]))
        examples = [self.train_data[self.order(p)] for p in positions]
        generators = [example_generator(self.cfg.seed, p) for p in positions]
        return [make_batch(examples[i:i + self.micro], self.loss_cfg, self.vocab_size, generators[i:i + self.micro])
                .to(self.env.device) for i in range(0, per_rank, self.micro)]

    # -------------------------------------------------------------------------------------------------- steps
    def train_step(self) -> StepStats:
        start = time.perf_counter()
        batches = self.step_batches(self.step)
        enc = bool(self.loss_cfg.encoder_loss_weight)
        counts = [sum(b.num_scored for b in batches), sum(b.num_next_token_scored for b in batches) if enc else 0,
                  sum(forward_tokens(b, self.loss_cfg) for b in batches)]
        d_count, e_count, read = (int(x) for x in D.all_reduce_sum(counts, self.env))
        scored = (d_count if self.loss_cfg.diffusion_loss_weight else 0) + e_count
        self.module.train()
        sums = [0.0, 0.0]
        for i, batch in enumerate(batches):
            if self.env.distributed:  # reduce-scatter gradients once, after the last micro-batch
                self.module.set_requires_gradient_sync(i == len(batches) - 1)
            with self._autocast():
                out: LossSums = self.module(batch)
            # FSDP averages gradients over ranks; scaling by the world size makes that a sum of the global loss.
            loss = total_loss(out, self.loss_cfg, d_count, e_count) * self.env.world_size
            loss.backward()
            sums[0] += float(out.diffusion.detach())
            sums[1] += float(out.encoder.detach())
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        d_sum, e_sum = D.all_reduce_sum(sums, self.env)
        diffusion, encoder = d_sum / max(d_count, 1), (e_sum / e_count if e_count else 0.0)
        return StepStats(loss=diffusion + self.loss_cfg.encoder_loss_weight * encoder, diffusion=diffusion,
                         encoder=encoder, grad_norm=grad_norm, lr=lr, loss_tokens=scored, forward_tokens=read,
                         seconds=time.perf_counter() - start)

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean losses on (at most `eval_examples` of) the held-out set, with fixed draws per held-out example so
        that evaluations at different steps are comparable."""
        if self.eval_data is None or not len(self.eval_data):
            return {}
        world = self.env.world_size
        n = min(len(self.eval_data), self.cfg.eval_examples)
        n -= n % world  # every rank must run the same number of forwards
        mine = list(range(self.env.rank, n, world))
        self.module.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        for i in range(0, len(mine), self.micro):
            idx = mine[i:i + self.micro]
            batch = make_batch([self.eval_data[j] for j in idx], self.loss_cfg, self.vocab_size,
                               [example_generator(self.cfg.seed, j, stream=1) for j in idx]).to(self.env.device)
            with self._autocast():
                out = self.module(batch)
            sums = [a + b for a, b in zip(sums, (float(out.diffusion), float(out.encoder), out.diffusion_count,
                                                 out.encoder_count))]
        d_sum, e_sum, d_count, e_count = D.all_reduce_sum(sums, self.env)
        diffusion, encoder = d_sum / max(d_count, 1), (e_sum / e_count if e_count else 0.0)
        return {"eval_loss": diffusion + self.loss_cfg.encoder_loss_weight * encoder, "eval_diffusion": diffusion,
                "eval_encoder": encoder, "eval_examples": n}

    # ----------------------------------------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        """Train from the latest checkpoint (when `resume`) to `steps`, then evaluate and write the model. Stopped
        early (`stop_after_steps`, SIGTERM or Ctrl-C; see `StopSignals`), it writes a resume checkpoint at the
        step it reached and returns unfinished; a finished run writes one at its last step too, so that a later
        run with more `steps` continues it with its optimizer state. Resuming a run that is complete already
        (the checkpoint at `steps` or beyond and its model / adapter written) does nothing."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        else:
            self._start_over()
        if self.step >= cfg.steps:  # resumed at the end: written already, or stopped before its outputs?
            outputs = D.broadcast_object(self._final_outputs() if self.env.is_main else None, self.env)
            if outputs is not None:
                return TrainResult(step=self.step, finished=True, last=None, eval={}, model_dir=outputs[0],
                                   adapter_dir=outputs[1], already_complete=True)
        with StopSignals(announce=self.env.is_main) as signals:
            stats, evals = self._train_steps(signals)
            if stats is not None:  # trained this time: leave the checkpoint the next run resumes from
                self.save_checkpoint()
            stopped_by = signals.agreed(self.env)  # a signal during that save stops the run all the same
        finished = self.step >= cfg.steps and stopped_by is None
        model_dir = adapter_dir = None
        if finished:  # with the previous signal handlers: a signal here stops as it would have before
            evals = self._eval_and_log(None)
            self._draw_loss_curve(force=True)  # the last lines (the eval line has drawn already: then a no-op)
            model_dir, adapter_dir = self.save_final()
        return TrainResult(step=self.step, finished=finished, last=stats, eval=evals, model_dir=model_dir,
                           adapter_dir=adapter_dir, stopped_by=stopped_by)

    def _train_steps(self, signals: StopSignals) -> tuple[StepStats | None, dict[str, float]]:
        """Steps up to `steps` (or `stop_after_steps` of them), logging, evaluating and saving on their schedule;
        leaves after the step during which `signals` got a stop request (every rank after the same step)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        stop = cfg.steps if cfg.stop_after_steps is None else min(cfg.steps, self.step + cfg.stop_after_steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.env.is_main))
        stats, evals, window = None, {}, []
        try:
            while self.step < stop:
                stats = self.train_step()
                window.append(stats)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                                fwd_tok_s=f"{stats.forward_tokens / max(stats.seconds, 1e-9):,.0f}")
                if self.step % max(cfg.log_every, 1) == 0 or self.step == cfg.steps:
                    self._log_metrics({"step": self.step, **window_means(window)})
                    window = []
                if signals.agreed(self.env):
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    evals = self._eval_and_log(bar)
                    if signals.agreed(self.env):  # an evaluation can be long: do not start another step
                        break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            if window:  # left early (time box, signal) within a logging window: log where it stood
                self._log_metrics({"step": self.step, **window_means(window)})
        finally:
            bar.close()
            if self.step < cfg.steps or signals.signum:
                self._draw_loss_curve(force=True)  # stopped early (time box, signal, error): show where it stood
        return stats, evals

    def _wanted_outputs(self) -> dict[str, Path]:
        lora = self.cfg.lora
        wanted = {"model": lora is None or self.cfg.merge, "adapter": lora is not None}
        return {name: self.out / name for name, want in wanted.items() if want}

    def _final_outputs(self) -> tuple[Path | None, Path | None] | None:
        """(model folder, adapter folder) when the checkpoint resumed from records that this run's outputs were
        written from it (and they are still there); None when they are to be written."""
        written = set(self._resumed_state.get("final_outputs", ()))
        wanted = self._wanted_outputs()
        if not (set(wanted) <= written and all(path.is_dir() for path in wanted.values())):
            return None
        return wanted.get("model"), wanted.get("adapter")

    def _eval_and_log(self, bar) -> dict[str, float]:
        metrics = self.evaluate()
        if self.eval_hook is not None:
            metrics.update(self.eval_hook(self))
        if metrics:
            self._log_metrics({"step": self.step, **metrics})
            if bar is not None and self.env.is_main:
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._draw_loss_curve(force="eval_loss" in record)

    def _draw_loss_curve(self, force: bool = False) -> None:
        """Redraw loss.png from metrics.jsonl (main rank; throttled unless `force`). A chart is never worth a
        training run: any failure (matplotlib missing, a full disk) is one warning and training goes on."""
        metrics = self.out / "metrics.jsonl"
        if not (self.cfg.plot and self.env.is_main) or not metrics.exists():
            return
        now, size = time.monotonic(), metrics.stat().st_size
        if size == self._plotted_size or (not force and now - self._last_plot < PLOT_EVERY_SECONDS):
            return  # nothing new since the last draw, or drawn recently
        self._last_plot, self._plotted_size = now, size
        try:
            from ..plots import plot_metrics_file

            plot_metrics_file(metrics, self.out / "loss.png", title=f"Training loss: {self.out.name}")
        except Exception as e:  # noqa: BLE001  (see the docstring)
            if not self._plot_warned:
                self._plot_warned = True
                log.warning("could not draw %s (training continues; --no-plot turns this off): %s",
                            self.out / "loss.png", e)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state_dict_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen weights (a LoRA base, frozen routers) come from the base checkpoint again; not strict on load
        # for that reason (dcp.load itself fails on any trainable tensor missing from the checkpoint).
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def save_checkpoint(self) -> Path:
        """Model (trainable part) and optimizer through torch.distributed.checkpoint (each rank writes its
        shards), plus scheduler, per-rank RNG state and the step. Temporary folder, then rename."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        root = self.out / "checkpoints"
        final, tmp = root / f"step-{self.step:07d}", root / f".tmp-step-{self.step:07d}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier(self.env)
        model_sd, optim_sd = get_state_dict(self.module, [self.optimizer], options=self._state_dict_options())
        with _quiet_single_process_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-{self.env.rank}.pt")
        D.barrier(self.env)
        if self.env.is_main:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": self.step, "world_size": self.env.world_size, "batch_size": self.cfg.batch_size,
                     "seed": self.cfg.seed, "lora": asdict(self.cfg.lora) if self.cfg.lora else None,
                     "canvas_length": self.model_config.canvas_length, "schedule": schedule_settings(self.cfg)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # written last: marks it complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
        D.barrier(self.env)
        return final

    def _prune_checkpoints(self, root: Path) -> None:
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[:-max(self.cfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in (self.out / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint, if any. Returns whether one was loaded."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = D.broadcast_object(self.latest_checkpoint() if self.env.is_main else None, self.env)
        if path is None:
            return False
        state = json.loads((path / STATE_FILE).read_text())
        mine = {"batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "lora": asdict(self.cfg.lora) if self.cfg.lora else None,
                "canvas_length": self.model_config.canvas_length}
        for key, value in mine.items():
            if key not in state:  # written before the key was recorded
                continue
            stored = state[key]
            if key == "lora" and stored is not None:
                stored = {**stored, "target_modules": tuple(stored["target_modules"])}
            if stored != value:
                raise TrainError(f"{path}: the checkpoint was written with {key}={stored}, this run has {value}; "
                                 f"use the same settings or a new --output folder")
        model_sd, optim_sd = get_state_dict(self.module, [self.optimizer], options=self._state_dict_options())
        sd = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process_dcp():
            dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(self.module, [self.optimizer], model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self._state_dict_options())
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-{self.env.rank}.pt"
        if rng_file.is_file() and state["world_size"] == self.env.world_size:
            _set_rng_state(torch.load(rng_file, weights_only=False))
        stored = state.get("schedule") or {"lr": self.scheduler.base_lrs[0]}  # (older checkpoints: the peak)
        follow_schedule(self.optimizer, self.scheduler, self._peak_lrs)
        self.step, self._resumed_state = int(state["step"]), state
        if self.env.is_main:
            self._truncate_metrics(self.step)
            change = schedule_change(stored, schedule_settings(self.cfg), self.step)
            if change:
                print(change, file=sys.stderr)
            if self.step > self.cfg.steps:
                print(f"the latest checkpoint is at step {self.step}, past --steps {self.cfg.steps}: its weights are "
                      "the run's (--no-resume starts over to stop at the earlier step)", file=sys.stderr)
            log.info("resumed from %s at step %d", path, self.step)  # once, not once per rank
        return True

    def _record_final_outputs(self, names: list[str]) -> None:
        """Note in the checkpoint at this step that the run's outputs were written from it: resuming it with the
        same `steps` then has nothing to do (main rank)."""
        path = self.out / "checkpoints" / f"step-{self.step:07d}" / STATE_FILE
        if not path.is_file():
            return
        state = {**json.loads(path.read_text()), "final_outputs": names}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    def _start_over(self) -> None:
        """`resume` off: remove the folder's checkpoints and metrics of an earlier run, which a later resume
        would otherwise take for this run's (its checkpoint at a later step, even one marked finished, would be
        the latest) and whose lines would mix with this run's."""
        if self.env.is_main:
            old = sorted((self.out / "checkpoints").glob("*step-*"))
            # its model / adapter folders too: left beside this run's checkpoints they would pass for its outputs
            outputs = [self.out / name for name in ("model", "adapter") if (self.out / name).is_dir()]
            if old or outputs or (self.out / "metrics.jsonl").exists():
                log.warning("starting over in %s: removing the earlier run's %d checkpoint(s), metrics%s", self.out,
                            len(old), "".join(f" and {p.name}/" for p in outputs))
            for path in old + outputs:
                shutil.rmtree(path, ignore_errors=True)
            for name in ("metrics.jsonl", "loss.png"):
                (self.out / name).unlink(missing_ok=True)
        D.barrier(self.env)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint (the interrupted run's steps are about to be redone)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------------ output
    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model as CPU tensors with our parameter names (every rank must call it under FSDP)."""
        model = self.module.model
        if not self.env.distributed:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in full.items()}

    def save_final(self) -> tuple[Path | None, Path | None]:
        state = self.full_state()
        model_dir = adapter_dir = None
        if self.env.is_main:
            lora = self.cfg.lora
            if lora is not None:
                adapter = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
                adapter_dir = save_adapter(adapter, lora, self.out / "adapter",
                                           base_model=str(self.cfg.model) if self.cfg.model else None)
            if lora is None or self.cfg.merge:
                weights = state if lora is None else self._merged(state, lora)
                model_dir = self.save_model(weights, self.out / "model")
            self._record_final_outputs([p.name for p in (model_dir, adapter_dir) if p is not None])
        D.barrier(self.env)
        return model_dir, adapter_dir

    def _merged(self, state: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
        """The adapter folded in, stored in the base's dtype as `letterpress merge-lora` stores it (the same
        merge gave a float32 folder here and a bfloat16 one there). Full fine-tuning saves what it trained."""
        from .merge import stored_dtype

        weights = merge_lora_state(state, lora.scaling)
        if self.base_dir is None:
            return weights
        dtype = stored_dtype(self.base_dir)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}

    def save_model(self, weights: dict[str, torch.Tensor], folder: Path) -> Path:
        """Write `weights` (our names) in the released format, with the tokenizer files copied."""
        with torch.device("meta"):
            model = DiffusionGemma(self.model_config)
        model.load_state_dict(weights, assign=True)
        extra = {name: self.tokenizer_dir / name for name in TOKENIZER_FILES if (self.tokenizer_dir / name).is_file()}
        return save_model(model, folder, self.config_dict, self.generation_config or self._default_generation_config(),
                          extra, vision_from=self.base_dir)

    def _default_generation_config(self) -> dict:
        text = self.model_config.text
        return {"max_new_tokens": self.model_config.canvas_length, "eos_token_id": list(text.eos_token_id),
                "pad_token_id": text.pad_token_id}

    @property
    def model(self) -> nn.Module:
        """The DiffusionGemma being trained (with LoRA modules when training LoRA; sharded under FSDP)."""
        return self.module.model


@contextmanager
def _quiet_single_process_dcp():
    """torch.distributed.checkpoint warns that it assumes one process when there is no process group: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train(config: TrainConfig, train_data: TokenizedDataset | None = None,
          eval_data: TokenizedDataset | None = None, eval_hook: EvalHook | None = None) -> TrainResult:
    """Build a Trainer and run it to `config.steps` (or `stop_after_steps`)."""
    return Trainer(config, train_data, eval_data, eval_hook).train()
