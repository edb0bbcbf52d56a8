"""The recipe `tiny-vlm`: a small DiffusionGemma with a Gemma 4 vision tower, trained from scratch on images our
code renders (letterpress.train.vlm_data: numbers, words, shapes, colours, dots, a bar chart).

    letterpress train --recipe tiny-vlm-tower --output runs/tower                    # stage 1 (vlm_tower.py)
    letterpress train --recipe tiny-vlm --model runs/tower --output runs/tiny-vlm    # stage 2 -> assets/tiny_vlm
    letterpress generate letterpress/assets/tiny_vlm --image x.png "What shape is this?"

Stage 2 with `--model` (a stage-1 output folder) starts from that tower, frozen, and its `embed_vision`, and
reads its training images from that folder's image cache; without `--model` tower and text model are trained
together from scratch (the earlier recipe, which did not learn to read images in the runs a CPU affords).
Stage 2 with `--tower-lr LR` fine-tunes the tower too, at peak lr LR on the same schedule (its standardisation
buffers stay as stage 1 set them).

The model (`vlm_config`): text decoder hidden 128, 2 layers (sliding, full), 4 experts top-2, canvas 8; vision
tower hidden 128, 2 layers (4 from stage 1), patch 16, no pooling, default tier 70 soft tokens (any image is
resized to at most 70 patches: a square one to 128x128 pixels = 8x8 patches = 64 soft tokens). The text model
(and, without `--model`, the tower) is trained by letterpress.train.loss with the image's soft tokens scattered
into the prompt, bidirectional within the image as at inference. Attention's q/k norms start at head_dim^-1/4
(`soften_attention`).

Half of the examples are plain prompts (`<bos><|image|>What shape is this?` -> answer + EOS, what
`letterpress generate --image` sends), half are one chat turn of CHAT_TEMPLATE (answer + `<turn|>`).

The tokenizer is a byte-level BPE (digits one per token) trained on the questions and answers, with the special
tokens of bpe.SPECIAL_TOKENS, the turn markers and the media placeholders at fixed ids (MEDIA_IDS).

The trainer here is a plain loop (the text `Trainer` has no images): AdamW, warmup + cosine, grad clipping, the
example stream a function of (seed, step), a resume checkpoint every `save_every` steps and where the run stops
(its last step, --stop-after-steps, SIGTERM or Ctrl-C: trainer.StopSignals), metrics.jsonl with the loss and,
every `eval_every` steps and at the end, exact-match accuracy on held-out images (benchmarks/vlm.py scores more).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..embedded import ASSETS
from ..tokenizer import Tokenizer
from . import vlm_data as V
from .vlm_tower import (ImageCache, build_vision, cache_is_complete, is_finished, load_resume, log_metrics,
                        read_checkpoint, save_resume, soften_attention, train_tower, write_run_json)
from .data import example_generator
from .loss import Example, LossConfig, diffusion_sum, encoder_sum, make_batch
from .recipe import Recipe, register, small_config

log = logging.getLogger(__name__)

VLM_DIR = ASSETS / "tiny_vlm"
VLM_CANVAS = 8  # the longest answer (3 digits + <turn|>) and its EOS fit one canvas
VLM_VOCAB = 512
CONTROL_TOKENS = ("<|turn>", "<turn|>")
MEDIA_TOKENS = ("<|image>", "<|image|>", "<image|>", "<|video|>")
# ids after bpe.SPECIAL_TOKENS (0-6): <|turn> 7, <turn|> 8, <|image> 9, <|image|> 10, <image|> 11, <|video|> 12
MEDIA_IDS = {"turn": 7, "end_turn": 8, "boi": 9, "image": 10, "eoi": 11, "video": 12}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|image|>{% elif p['type'] == 'video' %}<|video|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
PLAIN_SHARE = 0.5


# ------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_corpus(n: int = 4000) -> list[str]:
    """Questions and answers in both prompt forms (text only: the tokenizer never sees pixels)."""
    texts = []
    answers = [str(i) for i in range(1000)] + list(V.WORDS) + list(V.SHAPES) + list(V.COLOURS) + list(V.BAR_LABELS)
    for i in range(n):
        kind = V.KINDS[i % len(V.KINDS)]
        answer = answers[(i * 7919) % len(answers)]
        texts.append(f"<bos><|turn>user\n<|image|>{V.QUESTIONS[kind]}<turn|>\n<|turn>model\n{answer}<turn|>")
    # every answer word often enough to be one token (it follows "model\n" with no space before it)
    words = list(V.WORDS) + list(V.SHAPES) + list(V.COLOURS)
    return texts + ["\n".join(words)] * 200


def build_vlm_tokenizer(out_dir: Path = VLM_DIR, vocab_size: int = VLM_VOCAB) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja in `out_dir`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from .bpe import SPECIAL_TOKENS, _tokenizer_config

    specials = list(SPECIAL_TOKENS) + list(CONTROL_TOKENS) + list(MEDIA_TOKENS)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))])
    for name, i in (("<|turn>", 7), ("<turn|>", 8), ("<|image>", 9), ("<|image|>", 10), ("<image|>", 11),
                    ("<|video|>", 12)):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {**_tokenizer_config(), "model_max_length": 512}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out_dir


# ------------------------------------------------------------------------------------------------- model
def vlm_config(vocab_size: int = VLM_VOCAB, text_layers: int = 2, vision_layers: int = 2) -> dict:
    """config.json: the small text model of our recipes (hidden 128; `text_layers - 1` sliding layers then one
    full-attention layer) plus a Gemma 4 vision tower (hidden 128, patch 16, no pooling: at the default tier of
    70 soft tokens a 128x128 image is 8x8 patches = 64 soft tokens), in the released layout."""
    config = small_config(vocab_size=vocab_size, canvas_length=VLM_CANVAS, hidden_size=128, head_dim=32,
                          layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
                          sliding_window=128, max_position_embeddings=512, eos_token_id=(1, MEDIA_IDS["end_turn"]))
    config["text_config"]["use_bidirectional_attention"] = "vision"
    config.update({
        "image_token_id": MEDIA_IDS["image"], "boi_token_id": MEDIA_IDS["boi"], "eoi_token_id": MEDIA_IDS["eoi"],
        "vision_soft_tokens_per_image": 70,
        "vision_config": {
            "model_type": "gemma4_vision", "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": vision_layers, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
            "patch_size": 16, "pooling_kernel_size": 1, "position_embedding_size": 80, "standardize": False,
            "use_clipped_linears": False, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        },
    })
    return config


def generation_config() -> dict:
    """The sampler defaults the recipe writes (and `ship` puts into assets/tiny_vlm), chosen on validation
    images (BENCHMARKS.md, "Tiny vision-language model", "Decoding"). Temperatures around 1, not the released
    0.8 -> 0.4: below 1 the entropy of "end of answer here?" at the first step (the first digit not yet
    read) fell within the bound, EOS was accepted after one digit, and plain prompts lost their second
    digit (40 -> '4'); the temperature also scales the self-conditioning input, which training feeds at 1.
    Confidence threshold 0.05 (not 0.005): at temperature ~1 the mean entropy of a finished canvas rarely
    falls below 0.005, and 27% of answers ran to the 48-step cap; at 0.05 they take ~5 steps, as accurate."""
    return {"max_new_tokens": VLM_CANVAS, "eos_token_id": [1, MEDIA_IDS["end_turn"]], "pad_token_id": 0,
            "t_min": 0.9, "t_max": 1.1, "confidence_threshold": 0.05, "sampler_config": {"entropy_bound": 0.01}}


def build_models(config: dict, seed: int, std: float = 0.02):
    """(text model, vision model) with fresh weights."""
    from ..config import model_config_from_dict
    from ..model import DiffusionGemma

    text = DiffusionGemma(model_config_from_dict(config))
    text.init_weights(std, torch.Generator().manual_seed(seed))
    soften_attention(text.layers)
    return text, build_vision(config, seed, std)


def save_vlm(text, vision, folder: Path, config: dict, tokenizer_dir: Path) -> Path:
    """The released checkpoint layout: the text weights via checkpoint.save_model, then the tower's tensors
    under `model.encoder.vision_tower.*` / `model.encoder.embed_vision.*` in the same model.safetensors."""
    from safetensors.torch import load_file, save_file

    from ..checkpoint import SINGLE_FILE, save_model
    from ..embedded import TOKENIZER_FILES

    extra = {name: Path(tokenizer_dir) / name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()}
    folder = save_model(text, folder, config, generation_config(), extra_files=extra)
    path = folder / SINGLE_FILE
    state = load_file(str(path))
    for name, tensor in [*vision.named_parameters(), *vision.named_buffers()]:
        if not name.endswith("inv_freq"):
            state["model.encoder." + name] = tensor.detach().to(torch.float32).contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def ship(model_dir: str | Path, out_dir: Path = VLM_DIR, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a trained model into `out_dir` (assets/tiny_vlm) with its weights stored as `dtype` (the engine
    casts them back to its own dtype on load) and the recipe's current `generation_config()` (so a model
    trained before a sampler default changed ships with the new one); the tokenizer files there are kept."""
    from safetensors.torch import load_file, save_file

    from ..checkpoint import SINGLE_FILE

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(model_dir / SINGLE_FILE)).items()}
    save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    shutil.copyfile(model_dir / "config.json", out_dir / "config.json")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    return out_dir


def write_test_fixtures(out_dir: Path, per_kind: int = 2, model_dir: str | Path | None = None) -> Path:
    """The first `per_kind` held-out images of each kind as PNGs plus answers.json ({file: {kind, answer}}):
    the fixed images tests/test_tiny_vlm.py asks a shipped model about (files, so that the test does not depend
    on the fonts of the machine it runs on). With `model_dir`, each entry also records that model's greedy
    answer as `output` (the test checks the shipped model still gives exactly these, right or wrong)."""
    from .. import LLM, SamplingParams

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = {}
    for kind in V.KINDS:
        for i, sample in enumerate(V.held_out_samples(kind, per_kind)):
            name = f"{kind}{i}.png"
            sample.image.save(out_dir / name, optimize=True)
            answers[name] = {"kind": kind, "answer": sample.answer}
    if model_dir is not None:
        names = sorted(answers)
        outs = LLM(str(model_dir)).generate(
            [{"prompt": "<|image|>" + V.QUESTIONS[answers[n]["kind"]], "multi_modal_data": {"image": str(out_dir / n)}}
             for n in names], SamplingParams(greedy=True, seed=0))
        for name, out in zip(names, outs):
            answers[name]["output"] = out.text.strip()
    (out_dir / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------- examples
def prompt_text(question: str, chat: bool) -> str:
    if chat:
        return f"<bos><|turn>user\n<|image|>{question}<turn|>\n<|turn>model\n"
    return f"<bos><|image|>{question}"


def encode_example(sample: V.Sample, tokenizer: Tokenizer, processor, chat: bool):
    """(Example with the image placeholder expanded, the processed image)."""
    image = processor(sample.image)
    return question_example(sample.question, sample.answer, image.num_soft_tokens, tokenizer, chat), image


def encode_cached(cache, index: int, tokenizer: Tokenizer, chat: bool):
    """encode_example for image `index` of a stage-1 ImageCache (vlm_tower), without rendering it again."""
    from ..media.image import ProcessedImage

    pixels, positions = cache.batch([index])
    kind, answer = cache.meta[index]
    image = ProcessedImage(pixels[0], positions[0], pixels.shape[1], (0, 0))
    return question_example(V.QUESTIONS[kind], answer, image.num_soft_tokens, tokenizer, chat), image


def question_example(question: str, answer: str, soft_tokens: int, tokenizer: Tokenizer, chat: bool) -> Example:
    """The prompt with its image placeholder expanded to `soft_tokens` between <|image> and <image|>, and the
    answer (+ <turn|> in a chat turn) as the target."""
    ids = tokenizer.encode(prompt_text(question, chat), add_special_tokens=False)
    at = ids.index(MEDIA_IDS["image"])
    ids = ids[:at] + [MEDIA_IDS["boi"]] + [MEDIA_IDS["image"]] * soft_tokens + [MEDIA_IDS["eoi"]] + ids[at + 1:]
    target = tokenizer.encode(answer + ("<turn|>" if chat else ""), add_special_tokens=False)
    return Example(prompt=ids, target=target)


def load_tower(folder: str | Path) -> dict:
    """The stage-1 output of `tiny-vlm-tower` in `folder`: {"vision": state dict, "vision_config": ...,
    "cache": its ImageCache or None}; a user error when `folder` holds no tower.pt."""
    from ..errors import TrainError

    path = Path(folder) / "tower.pt"
    if not path.is_file():
        raise TrainError(f"--model {folder}: no tower.pt there; tiny-vlm starts from the output folder of "
                         "`letterpress train --recipe tiny-vlm-tower`, or from scratch without --model")
    state = torch.load(path, weights_only=False)
    cache_dir = Path(folder) / "cache"
    state["cache"] = ImageCache(cache_dir, mmap=True) if cache_is_complete(cache_dir) else None
    return state


def vlm_loss(text, vision, batch, images, cfg: LossConfig) -> torch.Tensor:
    """The loss of `batch` whose prompts hold one image each (`images`, in row order): the mean diffusion loss,
    plus the encoder's next-token loss on the answer when `cfg.encoder_loss_weight` is set."""
    from ..media.image import pad_batch

    pixels, positions = pad_batch(images)
    soft = vision(pixels, positions)  # [sum of soft tokens, text hidden]
    image = MEDIA_IDS["image"]
    loss = diffusion_sum(text, batch, cfg, soft_tokens=soft, soft_token_mask=batch.context_ids == image)
    loss = cfg.diffusion_loss_weight * loss / max(batch.num_scored, 1)
    if cfg.encoder_loss_weight:  # next-token loss of the answer on the clean prompt, image included
        encoder = encoder_sum(text, batch, cfg, soft_tokens=soft, soft_token_mask=batch.sequence_ids == image)
        loss = loss + cfg.encoder_loss_weight * encoder / max(batch.num_next_token_scored, 1)
    return loss


# ------------------------------------------------------------------------------------------------- evaluation
def exact_match(model_dir: str | Path, kinds: tuple[str, ...] = V.KINDS, n: int = 50, chat: bool = False,
                llm=None, batch: int = 16, wrong: int = 3, validation: bool = False,
                sampler: dict | None = None) -> dict:
    """Exact-match accuracy per kind on the first `n` held-out images of each kind (`validation`: of the
    validation seed instead), greedy, as `letterpress generate --image` (plain) or chat (`chat=True`) asks;
    `sampler`: SamplingParams fields that override the checkpoint's defaults. {kind: {"exact", "n", "wrong"}}."""
    from .. import LLM, SamplingParams

    llm = llm or LLM(str(model_dir), max_num_seqs=batch)
    draw = V.validation_samples if validation else V.held_out_samples
    out = {}
    for kind in kinds:
        samples = draw(kind, n)
        answers = []
        for start in range(0, n, batch):
            chunk = samples[start:start + batch]
            params = SamplingParams(greedy=True, seed=0, **(sampler or {}))
            if chat:
                convs = [[{"role": "user", "content": [{"type": "image", "image": s.image},
                                                        {"type": "text", "text": s.question}]}] for s in chunk]
                outs = llm.chat(convs, params)
            else:
                outs = llm.generate([{"prompt": "<|image|>" + s.question, "multi_modal_data": {"image": s.image}}
                                     for s in chunk], params)
            answers += [o.text.strip() for o in outs]
        right = [a == s.answer for a, s in zip(answers, samples)]
        out[kind] = {"exact": sum(right) / n, "n": n,
                     "wrong": [(s.answer, a) for a, s, ok in zip(answers, samples, right) if not ok][:wrong]}
    return out


# ------------------------------------------------------------------------------------------------- training
def train_vlm(cfg) -> int:
    """Run the recipe with `cfg` (a TrainConfig: steps, batch size, learning rates, seed, output folder, ...).
    Returns the exit status: 128 + the signal when SIGTERM or Ctrl-C stopped it (after a step, with a resume
    checkpoint), else 0."""
    from ..config import model_config_from_dict, vision_config_of
    from ..errors import TrainError
    from ..media.image import ImageProcessor
    from .trainer import StopSignals, adamw_with_schedule, finished_message, schedule_settings, stopped_message

    if cfg.tower_lr is not None and not cfg.model:
        raise TrainError("--tower-lr: only for stage 2 of tiny-vlm (--model a tiny-vlm-tower output folder)")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(out, cfg)
    if is_finished(out, state, cfg, out / "model" / "config.json"):
        print(finished_message(out, state["step"], cfg.steps), file=sys.stderr)
        return 0
    tokenizer_dir = Path(cfg.tokenizer or VLM_DIR)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_vlm_tokenizer(tokenizer_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    config = dict(cfg.model_config)
    tower = load_tower(cfg.model) if cfg.model else None
    if tower is not None:  # stage 2: the tower of a `tiny-vlm-tower` run, frozen; embed_vision keeps training
        config["vision_config"] = tower["vision_config"]
    mc = model_config_from_dict(config)
    processor = ImageProcessor.from_config(vision_config_of(mc))
    loss_cfg = replace(cfg.loss, canvas_length=mc.canvas_length, eos_id=tokenizer.eos_id)
    text, vision = build_models(config, cfg.seed, cfg.init_std)
    cache, tower_params = None, []
    if tower is not None:
        vision.load_state_dict(tower["vision"])
        cache = tower.get("cache")
        if cfg.tower_lr:  # fine-tuned at its own peak lr; std_bias/std_scale are buffers nothing here updates
            tower_params = list(vision.vision_tower.parameters())
        else:
            vision.vision_tower.requires_grad_(False)
    in_tower = {id(p) for p in tower_params}
    params = [p for p in (*text.parameters(), *vision.parameters()) if p.requires_grad and id(p) not in in_tower]
    # the tower's groups come after the others' (a resume checkpoint's optimizer state has them in this order)
    opt, sched = adamw_with_schedule(params, cfg, ((tower_params, cfg.tower_lr),) if tower_params else ())
    params += tower_params  # clipped together with the rest
    modules, schedule = {"text": text, "vision": vision}, schedule_settings(cfg, tower=bool(tower_params))
    try:
        step, wall = load_resume(out, state, modules, opt, sched, schedule)
    except ValueError as e:  # the optimizer's groups differ: the run trained the tower and this one not, or back
        raise TrainError(f"{out / 'checkpoint.pt'} was saved with different trained parameters ({e}); resume with "
                         "--tower-lr as the run started, or start over with --no-resume") from None
    metrics = out / "metrics.jsonl"
    if step == 0:
        write_run_json(out, cfg, config)
    stop = cfg.steps if cfg.stop_after_steps is None else min(cfg.steps, step + cfg.stop_after_steps)
    window: list[tuple[float, float]] = []

    def log_window() -> None:
        log_metrics(metrics, {"step": step, "loss": sum(x for x, _ in window) / len(window),
                              "grad_norm": sum(g for _, g in window) / len(window), "lr": lr[0],
                              **({"tower_lr": lr[-1]} if tower_params else {}), "seconds": seconds,
                              "wall_seconds": round(wall, 1)}, cfg.progress)
        window.clear()

    def evaluate() -> None:  # writes model/ to ask the engine
        text.eval()
        vision.eval()
        model_dir = save_vlm(text, vision, out / "model", config, tokenizer_dir)
        acc = exact_match(model_dir, n=min(cfg.eval_examples, 60), wrong=0)
        log_metrics(metrics, {"step": step, "eval": {k: v["exact"] for k, v in acc.items()},
                              "eval_mean": sum(v["exact"] for v in acc.values()) / len(acc)}, True)

    with StopSignals() as signals:
        while step < stop:
            start = time.perf_counter()
            text.train()
            vision.train()
            first = step * cfg.batch_size
            examples, images = [], []
            for i in range(first, first + cfg.batch_size):
                chat = (i * 2654435761 % 1000) / 1000 >= PLAIN_SHARE
                if cache is not None and i < len(cache):  # the images stage 1 rendered, already processed
                    ex, im = encode_cached(cache, i, tokenizer, chat)
                else:
                    ex, im = encode_example(V.training_sample(cfg.seed, i), tokenizer, processor, chat)
                examples.append(ex)
                images.append(im)
            batch = make_batch(examples, loss_cfg, mc.text.vocab_size,
                               [example_generator(cfg.seed, i) for i in range(first, first + cfg.batch_size)])
            loss = vlm_loss(text, vision, batch, images, loss_cfg)
            loss.backward()
            grad = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            lr = sched.get_last_lr()  # [the text model's and embed_vision's groups..., the tower's groups]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            wall += seconds
            window.append((float(loss.detach()), grad))
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_window()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and signals.signum is None:
                evaluate()
            # at the stop too: --stop-after-steps and signals leave resumable, and a finished run can go on
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop or signals.signum is not None:
                save_resume(out, modules, opt, sched, step, wall, schedule)
            if signals.signum is not None:
                break
        if window:  # stopped within a logging window: log where it stood
            log_window()
    if signals.signum is not None or step < cfg.steps:
        print(stopped_message(step, cfg.steps), file=sys.stderr)
        return signals.exit_status
    evaluate()  # the last evaluation (and model/): logged, it marks the run finished (`is_finished`)
    print(f"saved the model to {out / 'model'} ({wall / 60:.1f} min of training)")
    return 0


register(Recipe(
    name="tiny-vlm",
    description="the tiny vision-language model: a 2-layer DiffusionGemma (hidden 128, canvas 8) with a Gemma 4 "
                "vision tower (patch 16, 70 soft tokens) on rendered numbers, words, shapes, colours, dots and "
                "bar charts; --model a tiny-vlm-tower output starts from that pretrained tower (stage 2)",
    model_config=vlm_config(),
    tokenizer=str(VLM_DIR),
    # Stage 2 as run in BENCHMARKS.md ("Tiny vision-language model", run G) on a stage-1 tower (--model).
    hyperparameters=dict(steps=4000, batch_size=16, lr=1e-3, min_lr=5e-5, warmup_steps=100, beta1=0.9,
                         beta2=0.99, weight_decay=0.01, eval_every=500, log_every=20, eval_examples=60,
                         save_every=100, device="cpu", loss=LossConfig(encoder_loss_weight=1.0)),
    runner=train_vlm,
))


def tower_config(vision_layers: int = 4) -> dict:
    """The recipe's config.json with a 4-layer tower (stage 1 only trains its vision part; stage 2 takes the
    tower's shape from tower.pt)."""
    return vlm_config(vision_layers=vision_layers)


register(Recipe(
    name="tiny-vlm-tower",
    description="stage 1 of tiny-vlm: its vision tower + embed_vision pretrained as a classifier of rendered "
                "images (then `letterpress train --recipe tiny-vlm --model OUTPUT`)",
    model_config=tower_config(),
    # lr 4e-4: on shape images alone 3e-4 learned fastest of 1e-4 / 3e-4 / 1e-3 / 3e-3 (BENCHMARKS.md)
    hyperparameters=dict(steps=1900, batch_size=64, lr=4e-4, min_lr=4e-5, warmup_steps=100, beta1=0.9,
                         beta2=0.99, weight_decay=0.01, eval_every=500, log_every=20, eval_examples=200,
                         save_every=200, device="cpu"),
    runner=train_tower,
))
