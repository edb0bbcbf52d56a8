"""Prompts with images against transformers 5.23: image features scattered into the encoder input at the
placeholder positions, attention bidirectional within each image's run of tokens on every layer (sliding and
full) and causal elsewhere. The reference is given that mask explicitly (its plain forward builds it and
drops it, so images would be causal: reference digest §1.5)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

from letterpress.model import load_vision_model  # noqa: E402
from letterpress.media.image import pad_batch, ProcessedImage  # noqa: E402
from letterpress.model import DiffusionGemma  # noqa: E402
from letterpress.model.fast import apply_fast_path, apply_plain_path  # noqa: E402

from .test_vision import TINY, build_reference, random_image  # noqa: E402

IMG, BOI, EOI = 10, 11, 12
CANVAS = 8
# (width, height) in patches; patch 4, pooling kernel 2: soft tokens = w·h/4
GRIDS = {"A": (8, 6), "B": (4, 4), "C": (6, 4)}  # 12 (longer than the sliding window of 8), 4 and 6 tokens


def image(name: str) -> ProcessedImage:
    w, h = GRIDS[name]
    pixels, positions = random_image(w, h, TINY["patch_size"], None, seed=ord(name))
    return ProcessedImage(pixels, positions, w * h // 4, (h * 4, w * 4))


def run(name: str) -> list[int]:
    return [BOI] + [IMG] * image(name).num_soft_tokens + [EOI]


# Two images in row 0 (one longer than the window), one in row 1, rows of different lengths.
PROMPTS = [
    ([40, 41, 42] + run("A") + [43, 44] + run("B") + [45, 46], ["A", "B"]),
    ([50, 51] + run("C") + [52], ["C"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_prompts")
    ref = build_reference(folder, TINY)
    ref.config.canvas_length = CANVAS
    return ref, DiffusionGemma.from_pretrained(folder), load_vision_model(folder)


@pytest.fixture(params=["plain", "fast"])
def ours(request, models):
    model = models[1]
    if request.param == "fast":
        apply_fast_path(model)
    try:
        yield model
    finally:
        apply_plain_path(model)


def reference_logits(ref, canvas: torch.Tensor, bidirectional: bool = True) -> torch.Tensor:
    """Left-padded batch through the reference encoder (with the vision mask dict when `bidirectional`),
    then one decoder pass over `canvas`."""
    lengths = [len(ids) for ids, _ in PROMPTS]
    width = max(lengths)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), width, dtype=torch.bool)
    for i, (p, _) in enumerate(PROMPTS):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = True
    pad = torch.tensor([width - n for n in lengths])
    positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
    pixels, patch_positions = pad_batch([image(n) for _, names in PROMPTS for n in names])
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    attention = mask
    if bidirectional:
        attention = ref.model.encoder.create_masks_for_generate(
            ref.config, inputs_embeds=torch.zeros(*ids.shape, 0), attention_mask=mask, past_key_values=cache,
            position_ids=positions, mm_token_type_ids=(ids == IMG).long())
    with torch.no_grad():
        ref.model.encoder(input_ids=ids, pixel_values=pixels, image_position_ids=patch_positions,
                          attention_mask=attention, past_key_values=cache, position_ids=positions)
        dec_mask = torch.nn.functional.pad(mask, (0, CANVAS), value=True)
        dec_pos = torch.tensor(lengths)[:, None] + torch.arange(CANVAS)
        return ref(decoder_input_ids=canvas, past_key_values=cache, decoder_attention_mask=dec_mask,
                   decoder_position_ids=dec_pos).logits


def soft_tokens(vision, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(vision.embed_images([(image(n).pixel_values, image(n).positions) for n in names]))


CANVAS_IDS = torch.randint(0, 512, (2, CANVAS), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
@torch.no_grad()
def test_decoder_logits_match_reference_with_bidirectional_images(models, ours, cache_kind):
    ref, _, vision = models
    expected = reference_logits(ref, CANVAS_IDS)
    lengths = [len(p) for p, _ in PROMPTS]
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    for i, (p, _) in enumerate(PROMPTS):
        ids[i, : len(p)] = torch.tensor(p)
    features = soft_tokens(vision, [n for _, names in PROMPTS for n in names])
    if cache_kind == "paged":
        cache = ours.new_paged_cache(2, 64, block_size=4, prefill_chunk=32)
    else:
        cache = ours.new_cache(2, 64)
    ours.encode(ids, cache, input_lengths=torch.tensor(lengths), soft_tokens=features, soft_token_mask=ids == IMG)
    got = ours.denoise(CANVAS_IDS, cache)
    assert (got - expected).abs().max().item() <= 1e-4
    # the test has teeth: the causal variant (the reference's plain forward) is far from it
    causal = reference_logits(ref, CANVAS_IDS, bidirectional=False)
    assert (causal - expected).abs().max().item() > 1e-2


@torch.no_grad()
def test_chunked_prefill_at_image_boundaries_matches(models, ours):
    """Row 0 encoded in chunks that end just before and just after each image (never inside one), on a
    paged cache whose sliding layers give blocks back: the same logits as one pass."""
    ref, _, vision = models
    expected = reference_logits(ref, CANVAS_IDS)
    cache = ours.new_paged_cache(2, 64, block_size=4, prefill_chunk=16)
    for row, (prompt, names) in enumerate(PROMPTS):
        features = soft_tokens(vision, names)
        ids = torch.tensor(prompt)
        cuts = [0] + [i for i in range(1, len(prompt)) if (prompt[i] == BOI) or (prompt[i - 1] == EOI)] + [len(prompt)]
        used = 0
        for a, b in zip(cuts, cuts[1:]):
            chunk = ids[a:b][None]
            n = int((chunk == IMG).sum())
            ours.encode(chunk, cache, torch.tensor([row]), soft_tokens=features[used:used + n],
                        soft_token_mask=chunk == IMG)
            used += n
    got = ours.denoise(CANVAS_IDS, cache)
    assert (got - expected).abs().max().item() <= 1e-4


def test_soft_token_count_must_match(models):
    _, model, _ = models
    ids = torch.tensor([run("B")])
    with pytest.raises(ValueError, match="4 image placeholder positions but 3 soft tokens"):
        model.encode(ids, model.new_cache(1, 16), soft_tokens=torch.zeros(3, 64), soft_token_mask=ids == IMG)
