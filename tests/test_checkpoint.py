"""Loading the released checkpoint format: sharded files, shared weights stored once, dtypes, and clear
errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from letterpress.checkpoint import save_model
from letterpress.config import load_model_config
from letterpress.errors import CheckpointError, ConfigError
from letterpress.model import DiffusionGemma, load_model

from .reference import build_reference

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    build_reference(folder, canvas_length=8, weight_std=0.05, embed_std=0.5)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, saved):
    from transformers import DiffusionGemmaForBlockDiffusion

    folder = tmp_path_factory.mktemp("sharded")
    DiffusionGemmaForBlockDiffusion.from_pretrained(saved).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def logits_of(model: DiffusionGemma) -> torch.Tensor:
    cache = model.new_cache(1, 32)
    model.encode(torch.arange(3, 15)[None], cache)
    return model.denoise(torch.arange(20, 28)[None], cache)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(saved, sharded):
    assert len(list(sharded.glob("*.safetensors"))) > 1
    torch.testing.assert_close(logits_of(load_model(sharded)), logits_of(load_model(saved)), atol=0, rtol=0)


def test_shared_weights_stored_under_encoder_names(saved, tmp_path):
    """Another writer may store the shared weights once under the encoder's names."""
    folder = copy(saved, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("model.decoder.") and "self_conditioning" not in name and "layer_scalar" not in name:
            name = name.replace("model.decoder.", "model.encoder.language_model.")
        renamed[name] = tensor
    save_file(renamed, folder / "model.safetensors")
    torch.testing.assert_close(logits_of(load_model(folder)), logits_of(load_model(saved)), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_in_same_dtype(saved, dtype):
    """In bf16/fp16 we round where the reference rounds: our logits track the reference's low-precision
    logits much more closely than low precision tracks float32 (a random MoE even flips routes in bf16)."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    model = load_model(saved, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.inv_freq_sliding_attention.dtype == torch.float32  # RoPE frequencies stay exact

    def reference_logits(ref_dtype):
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(saved, dtype=ref_dtype).eval()
        cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
        with torch.no_grad():
            ref.model.encoder(input_ids=torch.arange(3, 15)[None], past_key_values=cache)
            return ref(decoder_input_ids=torch.arange(20, 28)[None], past_key_values=cache).logits

    ours, ref_low, ref_f32 = logits_of(model), reference_logits(dtype), reference_logits(torch.float32)
    assert (ours - ref_low).abs().mean() < (ref_low - ref_f32).abs().mean() / 2
    assert (ours.argmax(-1) == ref_low.argmax(-1)).float().mean() >= 0.9


def test_missing_shard(sharded, tmp_path):
    folder = copy(sharded, tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder)


def test_truncated_file(saved, tmp_path):
    folder = copy(saved, tmp_path / "ckpt")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_wrong_shape_names_tensor(saved, tmp_path):
    folder = copy(saved, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    name = "model.decoder.layers.1.mlp.up_proj.weight"
    state[name] = torch.zeros(5, 7)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight has shape \[5, 7\]"):
        load_model(folder)


def test_missing_tensor_names_tensor(saved, tmp_path):
    folder = copy(saved, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    del state["model.decoder.self_conditioning.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="self_conditioning.up_proj.weight is missing"):
        load_model(folder)


def test_config_errors(saved, tmp_path):
    folder = copy(saved, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama'"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(folder)


def test_offline_hub_id_and_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="offline"):
        load_model("nobody-letterpress/not-a-model", offline=True)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(str(tmp_path / "missing" / "deeper"))


def test_saved_by_us_loads_in_both(saved, tmp_path):
    """save_model writes the released format: our loader and transformers read it back identically."""
    from transformers import DiffusionGemmaForBlockDiffusion

    model = load_model(saved)
    raw = json.loads((saved / "config.json").read_text())
    out = save_model(model, tmp_path / "resaved", raw)
    torch.testing.assert_close(logits_of(load_model(out)), logits_of(model), atol=0, rtol=0)
    original = DiffusionGemmaForBlockDiffusion.from_pretrained(saved).state_dict()
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(out).state_dict()
    for name, tensor in original.items():
        if "vision" not in name:
            torch.testing.assert_close(reloaded[name], tensor, atol=0, rtol=0, msg=name)
    assert load_model_config(out).text.sliding_window == model.text_config.sliding_window


LOAD_MEMORY_SCRIPT = r"""
import sys
import torch
from letterpress.model import load_model
from letterpress.profiling import peak_anon_rss

model, peak = peak_anon_rss(lambda: load_model(sys.argv[1]))
size_kb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
print(peak / 1024 / size_kb)
"""


def test_loading_needs_about_one_model_of_memory(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (file pages are mmapped and
    reclaimable, so they are not counted)."""
    from letterpress.checkpoint import save_model
    from letterpress.config import model_config_from_dict
    from letterpress.model import DiffusionGemma

    raw = {"model_type": "diffusion_gemma", "canvas_length": 16, "text_config": {
        "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16,
        "top_k_experts": 2, "moe_intermediate_size": 512, "sliding_window": 64}}
    save_model(DiffusionGemma(model_config_from_dict(raw)).init_weights(), tmp_path / "m", raw)  # ~130 MB
    run = subprocess.run([sys.executable, "-c", LOAD_MEMORY_SCRIPT, str(tmp_path / "m")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # one model plus the largest tensor in flight (~1.25x here); twice the model would be 2.0
    assert float(run.stdout) < 1.5, f"peak anonymous memory was {float(run.stdout):.2f}x the model"


# ------------------------------------------------------------------------------------------ output folders
def test_an_output_folder_is_replaced_only_when_it_is_a_checkpoint(tmp_path):
    """Writing replaces the output folder whole: a new, empty or checkpoint folder is fine; a folder of other
    files (a mistyped path, the home folder) or a file is refused and left as it was."""
    from letterpress.checkpoint import atomic_folder

    def write(folder):
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text("{}")

    for folder in (tmp_path / "new", tmp_path / "empty", tmp_path / "old_checkpoint", tmp_path / "old_adapter"):
        folder.mkdir(exist_ok=folder.name != "new")
        if folder.name.startswith("old"):
            (folder / ("config.json" if "checkpoint" in folder.name else "adapter_config.json")).write_text("{}")
            (folder / "stale.safetensors").write_text("x")
        write(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json"]

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file"
    a_file.write_text("keep me too")
    for target, match in ((precious, "not empty and is not a checkpoint"), (a_file, "is not a folder")):
        with pytest.raises(CheckpointError, match=match):
            write(target)
    assert (precious / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new", "empty", "old_checkpoint", "old_adapter",
                                                                  "home", "file"])  # no temporary folder left


def test_cli_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint_and_a_corrupt_adapter(tmp_path):
    from letterpress.embedded import ASSETS

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "quantize", str(ASSETS / "tiny_code"), str(precious),
                          "--format", "int8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "not empty and is not a checkpoint" in run.stderr
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01")  # truncated
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "merge-lora", str(ASSETS / "tiny_code"),
                          str(adapter), str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "adapter_model.safetensors is not a readable safetensors file" in run.stderr
