"""A tiny random DiffusionGemma with a vision tower, a tokenizer that has the image and video placeholder tokens,
and a chat template that writes media parts as Gemma 4's templates do: for the engine, CLI and server tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from letterpress.embedded import default_model_dir

from .reference import BASE_TEXT
from .test_vision import TINY

MEDIA_TOKENS = ["<|image>", "<|image|>", "<image|>", "<|video|>"]
VOCAB = 4104  # the shipped tiny-code tokenizer's 4096 tokens + the four above (+ room)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|image|>{% elif p.type == 'video' %}<|video|>{% else %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_vision_checkpoint(folder: Path, seed: int = 0, canvas_length: int = 8) -> Path:
    """Save the checkpoint to `folder`: patch 4, pooling kernel 2, default tier 70 (images of ~70 soft tokens)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    source = default_model_dir()
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS])
    ids = {t: tok.token_to_id(t) for t in MEDIA_TOKENS}
    text = {**BASE_TEXT, "vocab_size": VOCAB, "use_bidirectional_attention": "vision", "pad_token_id": 0,
            "eos_token_id": 1, "bos_token_id": 2}
    vision = {**TINY, "position_embedding_size": 128}
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  image_token_id=ids["<|image|>"], boi_token_id=ids["<|image>"],
                                  eoi_token_id=ids["<image|>"], vision_soft_tokens_per_image=70)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.05 * torch.randn(p.shape))
            else:
                p.normal_(0.0, 0.03)
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_soft_tokens_per_image"] = 70
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save(str(folder / "tokenizer.json"))
    shutil.copyfile(source / "tokenizer_config.json", folder / "tokenizer_config.json")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
