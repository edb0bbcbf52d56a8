"""Stage 1 of the tiny vision-language model: the vision tower (and `embed_vision`) pretrained as an image
classifier, without the language model (recipe `tiny-vlm-tower`, registered in vlm.py with `tiny-vlm`; this
module sits below vlm.py and also builds the fresh tower both stages start from).

    letterpress train --recipe tiny-vlm-tower --output runs/tower     # stage 1 (this module)
    letterpress train --recipe tiny-vlm --model runs/tower --output runs/tiny-vlm      # stage 2 (vlm.py)

Why: trained end to end from scratch with the language model's loss, the tower never learned to read the
pictures in the time a CPU has (BENCHMARKS.md, "Tiny vision-language model"): the text model answered from the
question alone. A classifier gets a direct signal per image: a throwaway head (one attention-pooling query per
answer slot plus the mean of the image's soft tokens, then a linear layer) on the tower's projected soft tokens
names the answer of each kind (a number as three digit slots of 11 classes, "none" included; a word of 24; a
shape of 4; a colour of 6; a count of 9; a bar of 4); the loss is the cross-entropy of the sample's own kind.
The head's held-out accuracy is the ceiling the full model can reach with this tower.

The tower's output is standardised (the config's `standardize`, its `std_bias`/`std_scale` buffers set from a
running mean and spread of the training batches), so the language model sees features that differ between
images rather than one large image-independent vector.

Training images come from a cache (`build_cache`): images rendered once by vlm_data and processed at the
recipe's tier, stored as uint8 patches in numpy files, because rendering costs as much as a tower step.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import vlm_data as V

NUMBER_SLOTS = 3  # digits left to right; a shorter number leaves the last slots "none" (class 10)
CLASSES = {"number": 11, "word": len(V.WORDS), "shape": len(V.SHAPES), "colour": len(V.COLOURS), "count": 9,
           "chart": len(V.BAR_LABELS)}
CACHE_EXAMPLES = 72_000  # training images rendered once (12,000 per kind), fewer for a run that sees fewer
SLOTS = {kind: NUMBER_SLOTS if kind == "number" else 1 for kind in V.KINDS}


def labels_of(kind: str, answer: str) -> list[int]:
    """The class of each of `kind`'s slots for `answer` (padded with -1 to NUMBER_SLOTS)."""
    if kind == "number":
        out = [int(d) for d in answer] + [10] * (NUMBER_SLOTS - len(answer))
    elif kind == "word":
        out = [V.WORDS.index(answer)]
    elif kind == "shape":
        out = [V.SHAPES.index(answer)]
    elif kind == "colour":
        out = [list(V.COLOURS).index(answer)]
    elif kind == "count":
        out = [int(answer) - 1]
    else:
        out = [V.BAR_LABELS.index(answer)]
    return out + [-1] * (NUMBER_SLOTS - len(out))


def answer_of(kind: str, classes: list[int]) -> str:
    if kind == "number":
        return "".join(str(c) for c in classes if c < 10)
    c = classes[0]
    return {"word": lambda: V.WORDS[c], "shape": lambda: V.SHAPES[c], "colour": lambda: list(V.COLOURS)[c],
            "count": lambda: str(c + 1), "chart": lambda: V.BAR_LABELS[c]}[kind]()


# ------------------------------------------------------------------------------------------------- the tower
def build_vision(config: dict, seed: int, std: float = 0.02):
    """The vision model (tower + embed_vision) of `config` with fresh weights."""
    from ..config import model_config_from_dict, vision_config_of
    from ..model.layers import init_parameters
    from ..model.vision import VisionModel

    vision = VisionModel(vision_config_of(model_config_from_dict(config)))
    with torch.no_grad():
        init_parameters(vision, std, torch.Generator().manual_seed(seed + 1))
        init_patch_features(vision)
        soften_attention(vision.vision_tower.encoder.layers)
    return vision


@torch.no_grad()
def soften_attention(layers) -> None:
    """Start q_norm and k_norm at head_dim^-1/4 instead of 1. Gemma 4's attention normalises queries and keys
    and scales their product by 1.0, so with unit norm weights a fresh layer's logits have a spread of
    √head_dim (5.7 at 32): each query attends to one random key, the softmax saturates and learns slowly (a
    from-scratch tower stayed at chance on shapes and counts for 600 steps of 64). At head_dim^-1/4 the product
    is that of the usual 1/√head_dim scaling; the weights are free to grow from there."""
    for layer in layers:
        attn = layer.self_attn
        scale = attn.head_dim ** -0.25
        attn.q_norm.weight.fill_(scale)
        attn.k_norm.weight.fill_(scale)


@torch.no_grad()
def init_patch_features(vision, grid: int = 4, residual_scale: float = 0.1) -> None:
    """A head start for a tower trained from scratch on little data: the first 3·grid² rows of the patch
    projection start as the mean colour of each of grid x grid sub-blocks of the patch (a downsampled image,
    readable by attention from the first step), and each layer's output norms start at `residual_scale`, so the
    randomly initialised layers add little to those features until they have learned something."""
    cfg = vision.config
    p, d = cfg.patch_size, cfg.hidden_size
    if 3 * grid * grid > d or p % grid:
        return
    weight = vision.vision_tower.patch_embedder.input_proj.weight  # [D, p*p*3], input (py, px, c), c fastest
    cell = p // grid
    for gy in range(grid):
        for gx in range(grid):
            for c in range(3):
                row = torch.zeros(p, p, 3)
                row[gy * cell:(gy + 1) * cell, gx * cell:(gx + 1) * cell, c] = 1.0 / (cell * cell)
                weight[(gy * grid + gx) * 3 + c] = row.flatten()
    for layer in vision.vision_tower.encoder.layers:
        layer.post_attention_layernorm.weight.fill_(residual_scale)
        layer.post_feedforward_layernorm.weight.fill_(residual_scale)


# ------------------------------------------------------------------------------------------------- cache
def build_cache(folder: Path, samples, processor, progress: bool = False) -> Path:
    """Render and process `samples` (an iterable of vlm_data.Sample, its length known) into `folder`:
    pixels.npy uint8 [N, P, 3·p²] (P = the tier's patches, zero rows past an image's own), positions.npy int16
    [N, P, 2] ((-1, -1) for padding), meta.json (kind and answer of each)."""
    samples = list(samples) if not hasattr(samples, "__len__") else samples
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, p = len(samples), processor.max_patches()
    dim = processor.patch_size**2 * 3
    pixels = np.lib.format.open_memmap(folder / "pixels.tmp.npy", mode="w+", dtype=np.uint8, shape=(n, p, dim))
    positions = np.full((n, p, 2), -1, dtype=np.int16)
    meta = []
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        im = processor(sample.image)
        k = im.pixel_values.shape[0]
        pixels[i, :k] = np.rint(im.pixel_values.numpy() * 255).astype(np.uint8)
        positions[i, :k] = im.positions.numpy()
        meta.append([sample.kind, sample.answer])
        if progress and (i + 1) % 2000 == 0:
            print(f"cache {i + 1}/{n} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    pixels.flush()
    del pixels
    np.save(folder / "positions.npy", positions)
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "pixels.tmp.npy").replace(folder / "pixels.npy")
    return folder


class ImageCache:
    """A cache of `build_cache`, read into memory: `batch(indices)` -> (pixels float [B, P, D], positions
    long [B, P, 2], kinds [B], answers [B])."""

    def __init__(self, folder: Path, mmap: bool = False):
        folder = Path(folder)
        self.pixels = np.load(folder / "pixels.npy", mmap_mode="r" if mmap else None)
        self.positions = np.load(folder / "positions.npy")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.kinds = [k for k, _ in self.meta]
        self.labels = torch.tensor([labels_of(k, a) for k, a in self.meta])  # [N, NUMBER_SLOTS]
        self.kind_ids = torch.tensor([V.KINDS.index(k) for k in self.kinds])

    def __len__(self) -> int:
        return len(self.meta)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        pixels = torch.from_numpy(np.ascontiguousarray(self.pixels[idx])).float() * (1 / 255)
        positions = torch.from_numpy(self.positions[idx]).long()
        # trim padding columns no image of the batch uses
        used = int((positions[..., 0] >= 0).sum(dim=1).max())
        return pixels[:, :used], positions[:, :used]


def cache_is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return all((folder / n).is_file() for n in ("pixels.npy", "positions.npy", "meta.json"))


# ------------------------------------------------------------------------------------------------- the probe
class TowerProbe(nn.Module):
    """The vision model plus a throwaway classification head over its soft tokens (in the text width)."""

    def __init__(self, vision: nn.Module, width: int):
        super().__init__()
        self.vision = vision
        slots = [(kind, s) for kind in V.KINDS for s in range(SLOTS[kind])]
        self.slot_index = {key: i for i, key in enumerate(slots)}
        self.queries = nn.Parameter(torch.randn(len(slots), width) * width**-0.5)
        self.keys = nn.Linear(width, width, bias=False)
        self.heads = nn.ModuleDict({kind: nn.Linear(2 * width, CLASSES[kind]) for kind in V.KINDS})

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {kind: logits [B, slots, classes]} for every kind (the caller scores the sample's own)."""
        soft = self.vision(pixels, positions)  # [ΣN, W], images in order
        counts = (positions[..., 0] >= 0).sum(dim=1)  # [B]
        b, n, w = len(counts), int(counts.max()), soft.shape[-1]
        tokens = soft.new_zeros(b, n, w)
        valid = torch.arange(n)[None] < counts[:, None]  # [B, n]
        tokens[valid] = soft
        scores = torch.einsum("qw,bnw->bqn", self.queries, self.keys(tokens)) / w**0.5
        attn = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
        pooled = attn @ tokens  # [B, Q, W]
        mean = (tokens * valid[..., None]).sum(1) / counts[:, None]  # [B, W]
        out = {}
        for kind in V.KINDS:
            q = [self.slot_index[(kind, s)] for s in range(SLOTS[kind])]
            feats = torch.cat([pooled[:, q], mean[:, None].expand(b, len(q), w)], dim=-1)
            out[kind] = self.heads[kind](feats)
        return out


def probe_loss(logits: dict[str, torch.Tensor], kind_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored slots of each sample's own kind."""
    total, count = 0.0, 0
    for k, kind in enumerate(V.KINDS):
        rows = kind_ids == k
        if not bool(rows.any()):
            continue
        target = labels[rows, :SLOTS[kind]]  # [b, slots]
        lg = logits[kind][rows]
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=-1,
                                        reduction="sum")
        count += int((target >= 0).sum())
    return total / max(count, 1)


@torch.no_grad()
def update_standardization(tower, raw: torch.Tensor, momentum: float) -> None:
    """Move the tower's `std_bias`/`std_scale` towards the mean and 1/spread of `raw` (soft tokens before
    standardisation, [ΣN, D])."""
    mean, std = raw.mean(0), raw.std(0).clamp(min=1e-3)
    tower.std_bias.lerp_(mean, momentum)
    tower.std_scale.lerp_(1 / std, momentum)


@torch.no_grad()
def probe_accuracy(probe: TowerProbe, cache: ImageCache, batch: int = 64) -> dict[str, float]:
    """Exact match per kind of the probe's answers on every image of `cache`."""
    probe.eval()
    right = {k: 0 for k in V.KINDS}
    total = {k: 0 for k in V.KINDS}
    for start in range(0, len(cache), batch):
        idx = list(range(start, min(start + batch, len(cache))))
        pixels, positions = cache.batch(idx)
        logits = probe(pixels, positions)
        for j, i in enumerate(idx):
            kind = cache.kinds[i]
            got = answer_of(kind, logits[kind][j].argmax(-1).tolist())
            right[kind] += got == cache.meta[i][1]
            total[kind] += 1
    probe.train()
    return {k: right[k] / total[k] for k in V.KINDS if total[k]}


def set_standardization_hook(vision) -> list:
    """Capture the tower's soft tokens before standardisation (for `update_standardization`)."""
    captured: list[torch.Tensor] = []
    tower = vision.vision_tower
    original = tower.forward

    def forward(pixel_values, positions):
        out = original(pixel_values, positions)
        captured.append((out.float() / tower.std_scale.float() + tower.std_bias.float()).detach())
        return out

    tower.forward = forward
    return captured


def train_tower(cfg) -> int:
    """Stage 1 (recipe `tiny-vlm-tower`): train the tower + embed_vision of `cfg.model_config` as a classifier
    on a cache of rendered images; writes tower.pt ({"vision": state dict, "config": config}), metrics.jsonl
    with the loss and, every `eval_every` steps and at the end, the probe's held-out exact match per kind.
    Returns the exit status: 128 + the signal when SIGTERM or Ctrl-C stopped it (after a step, with a resume
    checkpoint and tower.pt), else 0."""
    from ..config import model_config_from_dict, vision_config_of
    from ..media.image import ImageProcessor
    from .trainer import StopSignals, adamw_with_schedule, finished_message, schedule_settings, stopped_message

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(out, cfg)
    if is_finished(out, state, cfg, out / "tower.pt"):
        print(finished_message(out, state["step"], cfg.steps), file=sys.stderr)
        return 0
    config = dict(cfg.model_config)
    config["vision_config"] = {**config["vision_config"], "standardize": True}
    mc = model_config_from_dict(config)
    vcfg = vision_config_of(mc)
    processor = ImageProcessor.from_config(vcfg)
    cache_dir, held_dir = out / "cache", out / "cache-held-out"  # (links to a cache of another run work too)
    n_train = min(CACHE_EXAMPLES, cfg.steps * cfg.batch_size)
    if not cache_is_complete(cache_dir):
        print(f"rendering {n_train} training images into {cache_dir}", file=sys.stderr, flush=True)
        build_cache(cache_dir, LazySamples(n_train, lambda i: V.training_sample(cfg.seed, i)), processor,
                    progress=cfg.progress)
    per_kind = max(cfg.eval_examples, 1)
    if not cache_is_complete(held_dir):
        build_cache(held_dir, [s for kind in V.KINDS for s in V.held_out_samples(kind, per_kind)], processor)
    train, held = ImageCache(cache_dir), ImageCache(held_dir)

    vision = build_vision(config, cfg.seed, cfg.init_std)
    probe = TowerProbe(vision, vcfg.text_hidden_size)
    captured = set_standardization_hook(vision)
    params = list(probe.parameters())
    opt, sched = adamw_with_schedule(params, cfg)
    modules, schedule = {"probe": probe}, schedule_settings(cfg)
    step, wall = load_resume(out, state, modules, opt, sched, schedule)
    metrics = out / "metrics.jsonl"
    if step == 0:
        write_run_json(out, cfg, config, cache_examples=len(train))
    gen = torch.Generator().manual_seed(cfg.seed)
    stop = cfg.steps if cfg.stop_after_steps is None else min(cfg.steps, step + cfg.stop_after_steps)
    trained = step < stop
    window: list[float] = []

    def log_window() -> None:
        log_metrics(metrics, {"step": step, "loss": sum(window) / len(window), "lr": lr,
                              "wall_seconds": round(wall, 1)}, cfg.progress)
        window.clear()

    def evaluate() -> None:  # the probe's held-out exact match per kind, logged
        acc = probe_accuracy(probe, held)
        log_metrics(metrics, {"step": step, "eval": acc, "eval_mean": sum(acc.values()) / len(acc)}, True)

    with StopSignals() as signals:
        while step < stop:
            start = time.perf_counter()
            gen.manual_seed(cfg.seed * 1_000_003 + step)  # the batch is a function of (seed, step): resumable
            idx = torch.randint(len(train), (cfg.batch_size,), generator=gen)
            pixels, positions = train.batch(idx.numpy())
            captured.clear()
            logits = probe(pixels, positions)
            loss = probe_loss(logits, train.kind_ids[idx], train.labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            # fast at first (the statistics move as the tower learns), then a slow average
            update_standardization(vision.vision_tower, captured[0], 0.5 if step < 20 else 0.05)
            step += 1
            wall += time.perf_counter() - start
            window.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == stop:
                log_window()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and signals.signum is None:
                evaluate()
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop or signals.signum is not None:
                save_resume(out, modules, opt, sched, step, wall, schedule)
                save_tower(vision, config, out / "tower.pt")
            if signals.signum is not None:
                break
        if window:  # stopped within a logging window: log where it stood
            log_window()
    if signals.signum is not None or step < cfg.steps:
        print(stopped_message(step, cfg.steps), file=sys.stderr)
        return signals.exit_status
    if not trained:  # resumed at the end, stopped before its last evaluation: finish without training
        save_tower(vision, config, out / "tower.pt")
    evaluate()  # the last evaluation: logged, it marks the run finished (`is_finished`)
    print(f"saved the tower to {out / 'tower.pt'} ({wall / 60:.1f} min of training)")
    return 0


# ------------------------------------------------------------------------------------------------- run folder
# The bookkeeping of a run folder that both tiny-vlm loops (this stage and vlm.py's stage 2) keep the same way:
# run.json at the start, a resume checkpoint of named modules + optimizer + schedule, metrics.jsonl lines, and
# a last evaluation at the last step that marks the run finished.
def write_run_json(out: Path, cfg, config: dict, **extra) -> None:
    (out / "run.json").write_text(json.dumps({
        "command": " ".join(sys.argv), "config": config, **extra,
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "model_config"},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__}, indent=2, default=str) + "\n")


def read_checkpoint(out: Path, cfg) -> dict | None:
    """The resume checkpoint in `out` (checkpoint.pt), None for a fresh run. With `cfg.resume` off the earlier
    run's checkpoint and metrics are removed first: a later resume would otherwise continue that run."""
    path, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    if not cfg.resume:
        if path.exists() or metrics.exists():
            print(f"starting over in {out}: removing the earlier run's checkpoint and metrics", file=sys.stderr)
        path.unlink(missing_ok=True)
        metrics.unlink(missing_ok=True)
        return None
    return torch.load(path, weights_only=False) if path.is_file() else None


def is_finished(out: Path, state: dict | None, cfg, output: Path) -> bool:
    """Whether checkpoint `state` is a run finished at `cfg.steps` (or beyond): `output` is there and the
    evaluation at its step was logged (the last thing a run does)."""
    if state is None or state["step"] < cfg.steps or not output.exists():
        return False
    return any("eval" in r and r["step"] == state["step"] for r in read_metrics(out / "metrics.jsonl"))


def load_resume(out: Path, state: dict | None, modules: dict[str, nn.Module], opt, sched,
                schedule: dict[str, float]) -> tuple[int, float]:
    """(step, training seconds) of checkpoint `state` loaded into `modules`, the optimizer and the schedule;
    (0, 0.0) without one. The learning rates follow this run's settings (`schedule`: schedule_settings), said
    in one line where they differ from the checkpoint's; metric lines after its step are dropped (those steps
    are about to be redone)."""
    from .trainer import follow_schedule, schedule_change

    if state is None:
        return 0, 0.0
    peaks = list(sched.base_lrs)  # this run's
    for name, module in modules.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # checkpoints written before the settings were recorded: the peaks their scheduler kept (the tower's last)
    stored = state.get("schedule") or {"lr": sched.base_lrs[0],
                                       **({"tower_lr": sched.base_lrs[-1]} if "tower_lr" in schedule else {})}
    follow_schedule(opt, sched, peaks)
    step = state["step"]
    truncate_metrics(out / "metrics.jsonl", step)
    print(f"resumed at step {step}", file=sys.stderr)
    change = schedule_change(stored, schedule, step)
    if change:
        print(change, file=sys.stderr)
    return step, state.get("wall_seconds", 0.0)


def save_resume(out: Path, modules: dict[str, nn.Module], opt, sched, step: int, wall: float,
                schedule: dict[str, float]) -> None:
    tmp = out / "checkpoint.pt.tmp"
    torch.save({**{name: m.state_dict() for name, m in modules.items()}, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "wall_seconds": wall, "schedule": schedule}, tmp)
    tmp.replace(out / "checkpoint.pt")  # whole or not at all: a stop mid-write keeps the last checkpoint


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (a resume redoes those steps)."""
    lines = [line for line in path.read_text().splitlines() if line] if path.is_file() else []
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def log_metrics(path: Path, record: dict, echo: bool) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if echo:
        print(json.dumps(record), file=sys.stderr, flush=True)


class LazySamples:
    """A sized sequence of samples drawn on access (so a cache of many images is never all in memory)."""

    def __init__(self, n: int, draw):
        self.n, self.draw = n, draw

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.draw(i) for i in range(self.n))


def save_tower(vision, config: dict, path: Path) -> None:
    state = {k: v.detach().clone() for k, v in vision.state_dict().items() if not k.endswith("inv_freq")}
    tmp = Path(str(path) + ".tmp")
    torch.save({"vision": state, "vision_config": config["vision_config"]}, tmp)
    tmp.replace(path)
