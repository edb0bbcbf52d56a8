"""letterpress against the real PEFT and transformers: adapters trained with PEFT on transformers' model load in
letterpress with the same logits (decoder-only, encoder-only and both, apart), letterpress's adapters load in
PEFT with the same logits and merge right, saved models load in transformers cleanly, files get the umask's
permissions. Tiny models, CPU."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from letterpress.checkpoint import PLACEHOLDER_VISION_CONFIG, save_model
from letterpress.cli import main as cli_main
from letterpress.errors import NotSupportedError
from letterpress.model import DiffusionGemma
from letterpress.train import lora as L
from letterpress.train.merge import merge_adapter

from .train_fixtures import CANVAS, decoder_logits, our_logits, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = torch.tensor([[2, 17, 33, 41, 9, 60]])
CANVAS_IDS = torch.arange(CANVAS)[None] + 100
LAYER_TARGETS = r"layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
PEFT_TARGETS = {
    "decoder": rf"model\.decoder\.(?:{LAYER_TARGETS}|self_conditioning\.\w+_proj)",
    "encoder": rf"model\.encoder\.language_model\.{LAYER_TARGETS}",
    # both passes, trained apart; the vision tower's projections too (letterpress ignores those)
    "both": rf"model\.(?:decoder|encoder\.language_model)\.(?:{LAYER_TARGETS}|self_conditioning\.\w+_proj)"
            r"|model\.encoder\.vision_tower\..*\.linear",
    # PEFT's most common setting: every linear layer (routers and vision tower too), both passes apart
    "all-linear": "all-linear",
}


# peft 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: their
# call, not ours, so it is silenced here only
PEFT_READS_A_DEPRECATED_FLAG = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    generation = {"max_new_tokens": CANVAS, "eos_token_id": [1, 5], "pad_token_id": 0}
    return save_model(tiny_model(3), tmp_path_factory.mktemp("base") / "ckpt", tiny_config(), generation)


def reference(folder: Path):
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()


def peft_trained_adapter(base_dir: Path, targets: str, folder: Path, seed: int = 0):
    """What a user training with PEFT on transformers saves: random (non-zero) A and B on the targets."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(reference(base_dir), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)  # keep the update moderate so that float32 logits compare at 1e-4
    model.save_pretrained(folder)
    return model


@PEFT_READS_A_DEPRECATED_FLAG
@pytest.mark.parametrize("passes", ["decoder", "encoder", "both", "all-linear"])
def test_peft_adapter_from_transformers_gives_peft_logits(tmp_path, base_dir, passes, caplog, capsys):
    model = peft_trained_adapter(base_dir, PEFT_TARGETS[passes], tmp_path / "peft")
    expected = decoder_logits(model.base_model.model, PROMPT, CANVAS_IDS)
    base = DiffusionGemma.from_pretrained(base_dir)
    assert (our_logits(base, PROMPT, CANVAS_IDS) - expected).abs().max() > 1e-2  # the adapter changes something

    ours = DiffusionGemma.from_pretrained(base_dir)
    with caplog.at_level(logging.WARNING, logger="letterpress.train.lora"):
        L.load_adapter(ours, tmp_path / "peft")
    apart = passes in ("both", "all-linear")
    assert ("vision tower" in caplog.text) == apart
    modules = L.lora_modules(ours)
    q = modules["layers.0.self_attn.q_proj"]
    assert q.passes == {"decoder": ("decoder",), "encoder": ("encoder",)}.get(passes, ("decoder",))
    assert (q.encoder_lora_A is not None) == apart
    assert ("layers.1.router.proj" in modules) == (passes == "all-linear")
    assert ("self_conditioning.up_proj" in modules) == (passes != "encoder")
    torch.testing.assert_close(our_logits(ours, PROMPT, CANVAS_IDS), expected, atol=1e-4, rtol=0)

    # ... and back: saved by letterpress, loaded by PEFT onto transformers, the same logits again
    saved = L.save_adapter(ours, L.read_adapter_config(tmp_path / "peft"), tmp_path / "ours")
    names = json.loads((saved / L.ADAPTER_CONFIG).read_text())["target_modules"]
    prefixes = {"decoder": {"model.decoder."}, "encoder": {"model.encoder.language_model."}}.get(
        passes, {"model.decoder.", "model.encoder.language_model."})
    assert {n.split("layers.")[0].split("self_conditioning.")[0] for n in names} == prefixes
    again = peft.PeftModel.from_pretrained(reference(base_dir), str(saved)).eval()
    torch.testing.assert_close(decoder_logits(again.base_model.model, PROMPT, CANVAS_IDS), expected, atol=1e-4,
                               rtol=0)

    # The two passes share their base weights: such an adapter has no merged form.
    with pytest.raises(NotSupportedError, match="encoder and decoder"):
        L.merge_lora(ours)
    with pytest.raises(NotSupportedError, match="encoder and decoder"):  # from the adapter alone, before the base loads
        merge_adapter(tmp_path / "no-base-needed", saved, tmp_path / "merged")
    capsys.readouterr()
    assert cli_main(["merge-lora", str(base_dir), str(saved), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "encoder and decoder" in err
    assert not (tmp_path / "merged").exists()


def test_peft_adapter_the_same_in_both_passes_loads_tied_and_merges(tmp_path, base_dir):
    """PEFT adapter whose encoder and decoder copies are equal (as letterpress saves them) is one adapter."""
    ours = DiffusionGemma.from_pretrained(base_dir)
    L.apply_lora(ours, L.LoRAConfig(rank=4, alpha=8), torch.Generator().manual_seed(1))
    for m in L.lora_modules(ours).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    folder = L.save_adapter(ours, L.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    loaded = DiffusionGemma.from_pretrained(base_dir)
    L.load_adapter(loaded, folder)
    assert all(m.tied for m in L.lora_modules(loaded).values())
    assert "_lora_running_pass" not in loaded.__dict__  # nothing to track for a tied adapter
    assert torch.equal(our_logits(loaded, PROMPT, CANVAS_IDS), our_logits(ours, PROMPT, CANVAS_IDS))


@PEFT_READS_A_DEPRECATED_FLAG
def test_peft_merges_our_adapter_right_with_the_decoder_targets(tmp_path, base_dir):
    """PEFT's merge_and_unload() adds a delta once per wrapped module; the encoder's and decoder's modules share
    one weight, so the saved adapter (both names, exact unmerged) is merged with the decoder's names only:
    then PEFT's merged model equals letterpress merge-lora's."""
    cfg = L.LoRAConfig(rank=4, alpha=8)
    ours = DiffusionGemma.from_pretrained(base_dir)
    L.apply_lora(ours, cfg, torch.Generator().manual_seed(2))
    for m in L.lora_modules(ours).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    expected = our_logits(ours, PROMPT, CANVAS_IDS)
    folder = L.save_adapter(ours, cfg, tmp_path / "adapter")
    merged_dir = merge_adapter(base_dir, folder, tmp_path / "merged")
    ours_merged = load_file(merged_dir / "model.safetensors")

    key = "model.decoder.layers.1.mlp.up_proj.weight"
    base_weight = load_file(base_dir / "model.safetensors")[key]
    delta = ours_merged[key] - base_weight
    assert delta.abs().max() > 1e-3

    # PEFT with the file as saved: exact unmerged, but its merge doubles the delta (why README says merge-lora).
    doubled = peft.PeftModel.from_pretrained(reference(base_dir), str(folder)).merge_and_unload()
    torch.testing.assert_close(doubled.state_dict()[key] - base_weight, 2 * delta, atol=1e-5, rtol=1e-4)

    # PEFT with the decoder's names only: right.
    config = peft.PeftConfig.from_pretrained(str(folder))
    config.target_modules = L.peft_merge_targets(json.loads((folder / L.ADAPTER_CONFIG).read_text()))
    merged = peft.PeftModel.from_pretrained(reference(base_dir), str(folder), config=config).merge_and_unload()
    state = merged.state_dict()
    for name in (key, "model.encoder.language_model.layers.0.self_attn.q_proj.weight",
                 "model.decoder.self_conditioning.gate_proj.weight"):
        stored = name.replace("encoder.language_model.", "decoder.")  # saved once, under the decoder's name
        torch.testing.assert_close(state[name], ours_merged[stored], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(decoder_logits(merged, PROMPT, CANVAS_IDS), expected, atol=1e-4, rtol=0)


def test_load_adapter_refuses_what_it_cannot_apply(tmp_path, base_dir):
    ours = DiffusionGemma.from_pretrained(base_dir)
    L.apply_lora(ours, L.LoRAConfig(rank=4, alpha=8))
    folder = L.save_adapter(ours, L.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    state = load_file(folder / L.ADAPTER_WEIGHTS)
    state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    state["base_model.model.lm_head.lora_B.weight"] = torch.zeros(512, 4)
    save_file(state, folder / L.ADAPTER_WEIGHTS)
    with pytest.raises(NotSupportedError, match="lm_head"):
        L.load_adapter(DiffusionGemma.from_pretrained(base_dir), folder)
    with pytest.raises(Exception, match="already has LoRA"):
        L.load_adapter(ours, folder)


class Collect(logging.Handler):
    """transformers logs through its own handler (not to the root logger that caplog reads): collect here."""

    def __init__(self):
        super().__init__()
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def test_text_only_model_loads_in_transformers_with_nothing_missing(tmp_path):
    config = tiny_config()
    del config["vision_config"]
    model = tiny_model(4)
    folder = save_model(model, tmp_path / "m", config, {"eos_token_id": [1], "pad_token_id": 0})
    saved = json.loads((folder / "config.json").read_text())
    assert saved["vision_config"] == PLACEHOLDER_VISION_CONFIG
    # the check can see a report: a model with a (tiny) vision config and no vision weights gets one
    with_vision = save_model(model, tmp_path / "v", tiny_config(), None)
    collect, hf_log = Collect(), logging.getLogger("transformers")
    hf_log.addHandler(collect)
    try:
        transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(with_vision)
        assert "MISSING" in collect.text
        collect.text = ""
        ref, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_log.removeHandler(collect)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "MISSING" not in collect.text and "LOAD REPORT" not in collect.text, collect.text
    vision = sum(p.numel() for n, p in ref.named_parameters() if "vision" in n)
    assert vision == 2 + 3 + 64  # the placeholder tower: position table, patch projection, embedding projection
    torch.testing.assert_close(decoder_logits(ref.eval(), PROMPT, CANVAS_IDS), our_logits(model, PROMPT, CANVAS_IDS),
                               atol=1e-4, rtol=0)
    # letterpress reads it back as it was, and a re-save keeps the placeholder (and its tensors)
    again = DiffusionGemma.from_pretrained(folder)
    assert torch.equal(our_logits(again, PROMPT, CANVAS_IDS), our_logits(model, PROMPT, CANVAS_IDS))
    resaved = save_model(again, tmp_path / "again", saved)
    assert load_file(resaved / "model.safetensors").keys() == load_file(folder / "model.safetensors").keys()


def test_merge_lora_keeps_the_base_vision_tower(tmp_path, base_dir):
    """letterpress runs text only; a merged (or fine-tuned) model copies the base's vision tensors through."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json"):
        (base / name).write_bytes((base_dir / name).read_bytes())
    state = load_file(base_dir / "model.safetensors")
    ref = reference(base_dir)
    vision = {n: p.detach().clone() for n, p in ref.state_dict().items() if n.startswith("model.encoder.vision")
              or n.startswith("model.encoder.embed_vision")}
    vision = {n: t for n, t in vision.items() if "rotary" not in n}
    save_file({**state, **vision}, base / "model.safetensors")
    ours = DiffusionGemma.from_pretrained(base)
    L.apply_lora(ours, L.LoRAConfig(rank=4, alpha=8))
    folder = L.save_adapter(ours, L.LoRAConfig(rank=4, alpha=8), tmp_path / "a")
    merged = load_file(merge_adapter(base, folder, tmp_path / "merged") / "model.safetensors")
    for name, tensor in vision.items():
        assert torch.equal(merged[name], tensor)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = tiny_model()
        folder = save_model(model, tmp_path / "m", tiny_config(), None)
        L.apply_lora(model, L.LoRAConfig(rank=2, alpha=4))
        adapter = L.save_adapter(model, L.LoRAConfig(rank=2, alpha=4), tmp_path / "a")
    finally:
        os.umask(old)
    files = [folder / "model.safetensors", folder / "config.json", adapter / L.ADAPTER_WEIGHTS,
             adapter / L.ADAPTER_CONFIG]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    assert not list(tmp_path.glob(".*"))  # no probe or temporary folder left behind
