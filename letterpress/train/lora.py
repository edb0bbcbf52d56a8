"""LoRA for DiffusionGemma: adapters on linear layers, saved in PEFT's file format, merged back for serving.

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the same `weight` (so checkpoint
names do not change) and adds `lora_A` [r, in] and `lora_B` [out, r]; output = W x + (alpha / r) * B A x.
Default targets: every linear layer of the text stack and the self-conditioning block (q/k/v/o projections,
dense MLP, self-conditioning MLP). The router stays frozen (DiffusionGemma SFT does not train it), and so do the
packed experts: their 3D weights are not `nn.Linear` and get no adapter; train them with full fine-tuning.

File format: PEFT's `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, where <module> is the module's name in transformers'
`DiffusionGemmaForBlockDiffusion`. transformers has separate (weight-tied) encoder and decoder modules while we
run one stack both ways, so each layer adapter is written twice, under `model.decoder.layers.N...` and
`model.encoder.language_model.layers.N...`: PEFT on transformers then computes exactly what we compute.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import atomic_folder
from ..errors import CheckpointError, NotSupportedError, TrainError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Last component of the module name (PEFT's suffix match). "router.proj" never matches: the router is frozen.
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        if self.rank < 1:
            raise TrainError("LoRA rank must be at least 1")
        self.target_modules = tuple(self.target_modules)


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update. `weight` / `bias` are the original parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # zero: training starts at the base
        self.scaling = alpha / rank
        self.dropout = dropout

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(update, self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r) B A folded in (computed in float32)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def target_names(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and n.rpartition(".")[2] in cfg.target_modules]
    if not names:
        raise TrainError(f"LoRA target modules {list(cfg.target_modules)} match no linear layer of the model")
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig, generator: torch.Generator | None = None,
               names: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap the targeted linear layers; only the LoRA parameters train. Returns the names."""
    model.requires_grad_(False)
    names = target_names(model, cfg) if names is None else names
    for name in names:
        lora = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout)
        if lora.weight.device.type != "meta":
            lora.reset_lora(generator)
        _set_module(model, name, lora)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is plain again (saveable, servable)."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    return model


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The same merge on a state dict (our names): drops `*.lora_A` / `*.lora_B`, updates `*.weight`."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            weight = state[module + ".weight"]
            delta = (state[module + ".lora_B"].float() @ state[key].float()) * scaling
            out[module + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return out


# ------------------------------------------------------------------------------------------------ PEFT format
def hf_module_names(ours: str) -> list[str]:
    """Our module name -> its name(s) in transformers' DiffusionGemmaForBlockDiffusion."""
    if ours.startswith("self_conditioning."):
        return ["model.decoder." + ours]
    return ["model.decoder." + ours, "model.encoder.language_model." + ours]


def target_regex(cfg: LoRAConfig) -> str:
    """PEFT `target_modules` as a regex (full match): only text modules, never the vision tower's projections."""
    names = "|".join(re.escape(t) for t in cfg.target_modules)
    return rf"model\.(?:decoder|encoder\.language_model)\.(?:layers\.\d+\.\w+|self_conditioning)\.(?:{names})"


def adapter_config(cfg: LoRAConfig, base_model: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": target_regex(cfg), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(lora_state: dict[str, torch.Tensor], cfg: LoRAConfig, folder: str | Path,
                 base_model: str | None = None) -> Path:
    """Write `lora_state` ({"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}, our names) in PEFT's
    format, through a temporary folder renamed into place."""
    state = {}
    for key, tensor in lora_state.items():
        module, _, which = key.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            continue
        for hf in hf_module_names(module):
            # clone: safetensors refuses tensors that share memory
            state[f"{PEFT_PREFIX}{hf}.{which}.weight"] = tensor.detach().to("cpu").clone().contiguous()
    if not state:
        raise TrainError("no LoRA parameters to save")
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, base_model), indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is this a LoRA adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise NotSupportedError(f"{path}: peft_type {raw.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(flag):
            raise NotSupportedError(f"{path}: {flag} adapters are not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise NotSupportedError(f"{path}: per-module rank_pattern / alpha_pattern is not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise NotSupportedError(f"{path}: adapters with trained biases or modules_to_save are not supported")
    return LoRAConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                      dropout=float(raw.get("lora_dropout", 0.0)), target_modules=DEFAULT_TARGETS)


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Wrap the modules the adapter file covers and load its weights into them. Encoder copies, when present,
    must equal the decoder's (we run one stack both ways)."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n in linear if f"{PEFT_PREFIX}{hf_module_names(n)[0]}.lora_A.weight" in stored]
    if not names:
        raise CheckpointError(f"{path}: no key matches a module of this model "
                              f"(expected e.g. {PEFT_PREFIX}{hf_module_names(linear[0])[0]}.lora_A.weight)")
    cfg.target_modules = tuple(sorted({n.rpartition(".")[2] for n in names}))
    apply_lora(model, cfg, names=names)
    for name, module in lora_modules(model).items():
        for which in ("lora_A", "lora_B"):
            keys = [f"{PEFT_PREFIX}{hf}.{which}.weight" for hf in hf_module_names(name)]
            tensor = stored[keys[0]]
            for other in keys[1:]:
                if other in stored and not torch.equal(stored[other], tensor):
                    raise NotSupportedError(f"{path}: {other} differs from {keys[0]}; letterpress shares one stack "
                                            "between encoder and decoder and needs one adapter for both")
            param = getattr(module, which)
            if tensor.shape != param.shape:
                raise CheckpointError(f"{path}: {keys[0]} has shape {list(tensor.shape)}, expected {list(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
    model.requires_grad_(False)
    return cfg
