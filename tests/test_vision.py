"""The vision tower + embed_vision against transformers 5.23's `get_image_features` on tiny random configs
(reference digest §1.6), with every buffer that starts at a constant randomized."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from letterpress.config import ModelConfig, load_model_config, vision_config_of
from letterpress.errors import CheckpointError, ConfigError
from letterpress.model import load_model, load_vision_model

from .reference import BASE_TEXT

transformers = pytest.importorskip("transformers")

# The digest's smallest config: clipped linears, standardize, GQA (4 heads over 2), patch 4, kernel 2.
TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=64, standardize=True,
            use_clipped_linears=True)
VARIANTS = {
    "clipped_standardized_gqa": TINY,
    # every switch the other way; a 3×3 kernel, another RoPE theta, no GQA
    "plain_k3": {**TINY, "standardize": False, "use_clipped_linears": False, "pooling_kernel_size": 3,
                 "num_key_value_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 37.0}},
}


def build_reference(folder, vision: dict, seed: int = 0):
    """A random transformers DiffusionGemma with this vision config, saved to `folder`."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = {**BASE_TEXT, "use_bidirectional_attention": "vision"}
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8, image_token_id=10,
                                  boi_token_id=11, eoi_token_id=12)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" not in name:
                continue
            if p.ndim == 1:  # norms
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding_table"):  # starts at ones
                p.normal_(0.0, 0.5, generator=g)
            else:
                p.normal_(0.0, 0.2, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("std_bias"):
                b.normal_(0.0, 0.5, generator=g)
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith(("input_min", "output_min")):  # ±inf at init; bounds that do clip some values
                b.fill_(-1.0 - torch.rand((), generator=g).item())
            elif name.endswith(("input_max", "output_max")):
                b.fill_(1.0 + torch.rand((), generator=g).item())
    model.save_pretrained(folder)
    return model


def random_image(width: int, height: int, patch: int, max_patches: int | None, seed: int):
    """Pixel patches [P, 3·p²] in [0, 1] and (x, y) positions of a width×height patch grid, right-padded to
    `max_patches` with zero rows at (-1, -1) when given."""
    g = torch.Generator().manual_seed(seed)
    n = width * height
    pixels = torch.rand(n, 3 * patch * patch, generator=g)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    if max_patches is not None and max_patches > n:
        pixels = torch.cat([pixels, torch.zeros(max_patches - n, pixels.shape[1])])
        positions = torch.cat([positions, torch.full((max_patches - n, 2), -1)])
    return pixels, positions


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_reference(folder, VARIANTS[request.param])
    return ref, load_vision_model(folder), VARIANTS[request.param]


def reference_features(ref, pixels, positions):
    with torch.no_grad():
        return ref.model.encoder.get_image_features(pixel_values=pixels, image_position_ids=positions).pooler_output


def test_two_images_of_different_sizes_padded_batch(pair):
    ref, ours, cfg = pair
    k, patch = cfg["pooling_kernel_size"], cfg["patch_size"]
    # grids (w, h) in patches: a wide and a tall image, padded to one length
    grids = [(4 * k, 2 * k), (k, 3 * k)]
    longest = max(w * h for w, h in grids) + 2 * k * k  # and a bit more padding than needed
    images = [random_image(w, h, patch, longest, seed=i) for i, (w, h) in enumerate(grids)]
    pixels = torch.stack([p for p, _ in images])
    positions = torch.stack([q for _, q in images])
    expected = reference_features(ref, pixels, positions)
    assert expected.shape == (sum(w * h for w, h in grids) // k**2, BASE_TEXT["hidden_size"])
    got = ours(pixels, positions)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    # one image at a time, padding dropped: the same features
    unpadded = torch.cat(ours.embed_images(images))
    assert (unpadded - expected).abs().max().item() <= 1e-5


def test_unpadded_single_image(pair):
    ref, ours, cfg = pair
    k, patch = cfg["pooling_kernel_size"], cfg["patch_size"]
    pixels, positions = random_image(3 * k, 2 * k, patch, None, seed=7)
    expected = reference_features(ref, pixels[None], positions[None])
    got = ours(pixels[None], positions[None])
    assert got.shape == (6, BASE_TEXT["hidden_size"])
    assert (got - expected).abs().max().item() <= 1e-5


def test_every_path_is_exercised(pair, tmp_path):
    """The randomized buffers matter: resetting them to their init values changes the features."""
    ref, ours, cfg = pair
    k, patch = cfg["pooling_kernel_size"], cfg["patch_size"]
    pixels, positions = random_image(2 * k, 2 * k, patch, None, seed=3)
    base = ours(pixels[None], positions[None])
    tower = ours.vision_tower
    names = ["patch_embedder.position_embedding_table"]
    if cfg["standardize"]:
        names += ["std_bias", "std_scale"]
    if cfg["use_clipped_linears"]:
        names += ["encoder.layers.0.mlp.down_proj.input_min", "encoder.layers.0.self_attn.q_proj.output_max"]
    for name in names:
        tensor = tower.get_parameter(name) if "table" in name else tower.get_buffer(name)
        saved = tensor.detach().clone()
        init = {"std_bias": 0.0, "std_scale": 1.0, "input_min": -float("inf"), "output_max": float("inf")}
        tensor.data.fill_(next((v for key, v in init.items() if name.endswith(key)), 1.0))
        changed = (ours(pixels[None], positions[None]) - base).abs().max().item()
        tensor.data.copy_(saved)
        assert changed > 1e-3, name


def test_axes_are_not_interchangeable(pair):
    """x rotates the first half of each head, y the second: transposing the grid's positions matters."""
    _, ours, cfg = pair
    k, patch = cfg["pooling_kernel_size"], cfg["patch_size"]
    pixels, positions = random_image(2 * k, 2 * k, patch, None, seed=5)
    swapped = positions.flip(-1)
    # pooling of a square grid only permutes cells; compare sets of features by sorting rows
    a = ours(pixels[None], positions[None]).sort(dim=0).values
    b = ours(pixels[None], swapped[None]).sort(dim=0).values
    assert (a - b).abs().max().item() > 1e-3


def test_vision_config_parsing(tmp_path, pair):
    _, ours, cfg = pair
    vc = ours.config
    assert (vc.hidden_size, vc.head_dim, vc.pooling_kernel_size) == (32, 8, cfg["pooling_kernel_size"])
    assert vc.standardize == cfg["standardize"] and vc.use_clipped_linears == cfg["use_clipped_linears"]
    assert vc.rope_theta == cfg.get("rope_parameters", {}).get("rope_theta", 100.0)
    assert vc.text_hidden_size == BASE_TEXT["hidden_size"] and vc.default_soft_tokens == 280

    def parse(vision, **top):
        raw = {"model_type": "diffusion_gemma", "text_config": {**BASE_TEXT}, "vision_config": vision, **top}
        from letterpress.config import model_config_from_dict

        return vision_config_of(model_config_from_dict(raw))

    assert parse(None) is None
    assert parse({"num_hidden_layers": 0, "hidden_size": 1, "head_dim": 2}) is None  # letterpress's placeholder
    released = parse({"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                      "num_key_value_heads": 16, "head_dim": 72, "standardize": True, "default_output_length": 280,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}},
                     vision_soft_tokens_per_image=280)
    assert released.head_dim == 72 and released.standardize and released.patch_dim == 768
    assert parse({}).hidden_size == 768  # transformers' class defaults for absent keys
    with pytest.raises(ConfigError, match="axial"):
        parse({"rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ConfigError, match="multiple of 4"):
        parse({"head_dim": 6})
    with pytest.raises(ConfigError, match="tier"):
        parse({}, vision_soft_tokens_per_image=100)


def test_text_only_checkpoints_keep_working(tmp_path):
    """A shipped model has no vision config: the text model loads, the vision loader says why it cannot."""
    from letterpress.embedded import ASSETS

    folder = ASSETS / "tiny_code"
    assert vision_config_of(load_model_config(folder)) is None
    assert load_model(folder) is not None
    with pytest.raises(CheckpointError, match="text-only"):
        load_vision_model(folder)


def test_missing_vision_tensors_are_reported(tmp_path, pair):
    """A config with a vision tower but no vision tensors (as a text-only save may write) loads as text,
    and the vision loader names the missing tensor."""
    ref, _, _ = pair
    folder = tmp_path / "novision"
    ref.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "vision" not in k}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="vision_tower"):
        load_vision_model(folder)
    json.loads((folder / "config.json").read_text())["vision_config"]  # still there
    assert isinstance(load_model_config(folder), ModelConfig)


def test_bfloat16_and_bad_inputs(tmp_path, pair):
    """bfloat16 runs (pooling, scaling and standardizing stay in float32) and stays near float32; inputs
    the tower cannot take get a clear error."""
    ref, ours, cfg = pair
    k, patch = cfg["pooling_kernel_size"], cfg["patch_size"]
    pixels, positions = random_image(2 * k, 3 * k, patch, None, seed=11)
    full = ours(pixels[None], positions[None])
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    bf16.init_rope()  # as load_vision_model does: RoPE frequencies stay float32
    half = bf16(pixels[None], positions[None])
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max().item() <= 0.05 * full.abs().max().item()
    with pytest.raises(ValueError, match="position table"):
        ours(pixels[None], (positions + 64)[None])
    with pytest.raises(ValueError, match="pooled"):
        ours(pixels[None, :-1], positions[None, :-1])
    with pytest.raises(ValueError, match="expected"):
        ours(pixels, positions)
