"""Tiny models, tokenizers and data files for the training tests (CPU, seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from letterpress.checkpoint import save_model
from letterpress.config import model_config_from_dict
from letterpress.model import DiffusionGemma
from letterpress.train.bpe import train_bpe

CANVAS = 8
TEXT = dict(
    model_type="diffusion_gemma_text", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    sliding_window=8, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
    layer_types=["sliding_attention", "full_attention"], eos_token_id=[1, 5], pad_token_id=0, bos_token_id=2,
)
# transformers always builds a vision tower: keep it tiny so that it can load what we save.
VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16)


def tiny_config(canvas: int = CANVAS, **text) -> dict:
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": canvas, "tie_word_embeddings": True, "text_config": {**TEXT, **text},
            "vision_config": VISION}


def tiny_model(seed: int = 0, **text) -> DiffusionGemma:
    """Random weights with norms and scalars away from 1, so every weight matters."""
    model = DiffusionGemma(model_config_from_dict(tiny_config(**text)))
    g = torch.Generator().manual_seed(seed)
    model.init_weights(0.1, g)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for layer in model.layers:
            layer.encoder_scalar.fill_(0.9)
            layer.decoder_scalar.fill_(1.1)
    return model.requires_grad_(False)


def make_tokenizer(folder: Path) -> Path:
    texts = [f"{i} + {j} = {i + j}\n" for i in range(40) for j in range(40)]
    texts += ["the quick brown fox jumps over the lazy dog\n"] * 20
    return train_bpe(texts, 320, folder)


def make_checkpoint(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from letterpress.embedded import TOKENIZER_FILES

    extra = {f: tokenizer_dir / f for f in TOKENIZER_FILES}
    generation = {"max_new_tokens": CANVAS, "eos_token_id": [1, 5], "pad_token_id": 0}
    return save_model(tiny_model(seed), folder, tiny_config(), generation, extra)


def addition_lines(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"{i % 37} + {i % 11} =", "completion": f" {i % 37 + i % 11}"}
            for i in range(offset, offset + n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@torch.no_grad()
def our_logits(model, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Encode `prompt` [1, T], then denoise `canvas` [1, C] with letterpress: logits [1, C, vocab]."""
    cache = model.new_cache(1, prompt.shape[1])
    model.encode(prompt, cache)
    return model.denoise(canvas, cache)


@torch.no_grad()
def decoder_logits(ref, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """The same with transformers' DiffusionGemmaForBlockDiffusion (or PEFT's model around it)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    n = prompt.shape[1]
    ref.model.encoder(input_ids=prompt, attention_mask=torch.ones_like(prompt, dtype=torch.bool),
                      past_key_values=cache, position_ids=torch.arange(n)[None])
    return ref(decoder_input_ids=canvas, past_key_values=cache,
               decoder_attention_mask=torch.ones(1, n + canvas.shape[1], dtype=torch.bool),
               decoder_position_ids=n + torch.arange(canvas.shape[1])[None]).logits


def sigterm_after_first_log(args: list[str], out: Path, timeout: float) -> tuple[int, str]:
    """Run `python -m letterpress.cli *args --output out` as a real process (one thread), send it SIGTERM once its
    metrics.jsonl holds a line, and wait for it: (exit status, stderr). Fails if nothing is logged in `timeout` s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "letterpress.cli", *args, "--output", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"no step logged in {timeout:.0f} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr
