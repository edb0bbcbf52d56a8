"""LoRA for DiffusionGemma: adapters on linear layers, saved in PEFT's file format, merged back for serving.

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the same `weight` (so checkpoint
names do not change) and adds `lora_A` [r, in] and `lora_B` [out, r]; output = W x + (alpha / r) * B A x.
Default targets: every linear layer of the text stack and the self-conditioning block (q/k/v/o projections,
dense MLP, self-conditioning MLP). The router stays frozen (DiffusionGemma SFT does not train it), and so do the
packed experts: their 3D weights are not `nn.Linear` and get no adapter; train them with full fine-tuning.

Encoder and decoder passes. We run one stack both ways (`encode`, `denoise`); transformers has separate
encoder and decoder modules whose weights are tied. An adapter may still differ between them (PEFT can target
`model.decoder.*` only, or train both sides apart), so each `LoRALinear` knows which passes its `lora_A` /
`lora_B` apply to, and may hold the encoder's own, different adapter beside them (`encoder_lora_A` /
`encoder_lora_B`). Our own training learns one adapter for both passes (a "tied" adapter).

File format: PEFT's `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, where <module> is the module's name in transformers'
`DiffusionGemmaForBlockDiffusion`: `model.decoder.<ours>` for the decoder pass, and
`model.encoder.language_model.<ours>` for the encoder pass. A tied adapter is written under both names, so PEFT
on transformers computes exactly what we compute. PEFT's `merge_and_unload()` then adds the delta twice to the
tied weight (it merges each wrapped module into the one shared parameter): merge with `letterpress merge-lora`,
or load the adapter into PEFT with `target_modules` cut to the decoder's names (`peft_merge_targets`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import _open, atomic_folder
from ..errors import CheckpointError, NotSupportedError, TrainError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ENCODER, DECODER = "encoder", "decoder"
BOTH = (ENCODER, DECODER)
# Where each pass's modules live in transformers' DiffusionGemmaForBlockDiffusion.
HF_PREFIX = {DECODER: "model.decoder.", ENCODER: "model.encoder.language_model."}


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


def module_passes(ours: str) -> tuple[str, ...]:
    """The passes one of our modules runs in: the self-conditioning block runs in the decoder's only."""
    return (DECODER,) if ours.startswith("self_conditioning.") else BOTH


class RunningPass:
    """Which pass of the shared stack is running ("encoder", "decoder" or None), for adapters that differ
    between the passes. `track_passes` sets it around `model.encode` / `model.denoise`."""

    def __init__(self):
        self.name: str | None = None


class _PassEntry:
    """`model.encode` / `model.denoise` with the running pass recorded around the call. An object rather than a
    closure so that `copy.deepcopy(model)` gives the copy entries bound to the copy."""

    def __init__(self, inner, name: str, running: RunningPass):
        self.inner, self.name, self.running = inner, name, running

    def __call__(self, *args, **kwargs):
        previous, self.running.name = self.running.name, self.name
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.running.name = previous


def track_passes(model: nn.Module) -> RunningPass:
    """Make `model.encode` / `model.denoise` record the running pass (once per model) and give every LoRA
    module the record."""
    running = model.__dict__.get("_lora_running_pass")
    if running is None:
        running = RunningPass()
        for method, name in (("encode", ENCODER), ("denoise", DECODER)):
            object.__setattr__(model, method, _PassEntry(getattr(model, method), name, running))
        object.__setattr__(model, "_lora_running_pass", running)
    for module in lora_modules(model).values():
        module.running = running
    return running


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update. `weight` / `bias` are the original parameters.

    `lora_A` / `lora_B` apply in the passes named in `passes`; `encoder_lora_A` / `encoder_lora_B`, when set,
    are the encoder pass's own adapter (then `passes` is ("decoder",)). A pass with neither runs the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 passes: tuple[str, ...] = BOTH):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(self._zeros(rank, base.in_features))
        self.lora_B = nn.Parameter(self._zeros(base.out_features, rank))  # zero: training starts at the base
        self.encoder_lora_A: nn.Parameter | None = None
        self.encoder_lora_B: nn.Parameter | None = None
        self.scaling = alpha / rank
        self.dropout = dropout
        self.passes = tuple(p for p in BOTH if p in passes)
        self.running: RunningPass | None = None  # set by `track_passes`; needed unless the adapter is tied

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.weight.dtype, device=self.weight.device)

    def set_encoder_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Give the encoder pass its own adapter; `lora_A` / `lora_B` then apply to the decoder pass only."""
        self.passes = (DECODER,)
        self.encoder_lora_A = nn.Parameter(self._zeros(*self.lora_A.shape), requires_grad=False)
        self.encoder_lora_B = nn.Parameter(self._zeros(*self.lora_B.shape), requires_grad=False)
        with torch.no_grad():
            self.encoder_lora_A.copy_(a)
            self.encoder_lora_B.copy_(b)

    @property
    def tied(self) -> bool:
        """One adapter for both passes: true of everything our training makes; the only kind we can merge."""
        return self.passes == BOTH and self.encoder_lora_A is None

    def adapter_for(self, pass_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [r, in], B [out, r]) that the given pass applies, or None."""
        if pass_name in self.passes:
            return self.lora_A, self.lora_B
        if pass_name == ENCODER and self.encoder_lora_A is not None:
            return self.encoder_lora_A, self.encoder_lora_B
        return None

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.tied:
            adapter = self.lora_A, self.lora_B
        else:
            running = self.running.name if self.running is not None else None
            if running is None:
                raise NotSupportedError("this LoRA adapter differs between the encoder and decoder passes: run the "
                                        "model through model.encode / model.denoise (see lora.track_passes)")
            adapter = self.adapter_for(running)
            if adapter is None:
                return out
        update = F.dropout(x, self.dropout, self.training) if self.dropout else x
        a, b = adapter  # float32 on a bfloat16 base while training (upcast_adapters): the update runs in theirs
        return out + (F.linear(F.linear(update.to(a.dtype), a), b) * self.scaling).to(out.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r) B A folded in (computed in float32)."""
        if not self.tied:
            raise NotSupportedError(_UNTIED_MERGE)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out


_UNTIED_MERGE = ("this adapter is not the same in the encoder and decoder passes (it names one pass only, or "
                 "differs between them), but both passes share every base weight, so no merged checkpoint can "
                 "compute what it computes; use it unmerged: letterpress.train.load_adapter(model, folder)")


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
    """Freeze the model and wrap the targeted linear layers with one adapter for both passes; only the LoRA
    parameters train. Returns the names."""
    model.requires_grad_(False)
    names = target_names(model, cfg) if names is None else names
    for name in names:
        lora = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout)
        if lora.weight.device.type != "meta":
            lora.reset_lora(generator)
        _set_module(model, name, lora)
    return names


def upcast_adapters(model: nn.Module) -> int:
    """Keep every trainable adapter in float32 on a lower-precision base (PEFT's autocast_adapter_dtype): in
    bfloat16 most small updates round away (3 steps at 1.5e-5 changed 5% of lora_A's entries, against 89% in
    float32). Returns how many adapters were upcast."""
    count = 0
    for module in lora_modules(model).values():
        if module.lora_A.dtype in (torch.bfloat16, torch.float16):
            module.lora_A = nn.Parameter(module.lora_A.detach().float(), requires_grad=module.lora_A.requires_grad)
            module.lora_B = nn.Parameter(module.lora_B.detach().float(), requires_grad=module.lora_B.requires_grad)
            count += 1
    return count


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is plain again (saveable, servable).
    Refuses (before changing anything) an adapter that differs between the passes."""
    modules = lora_modules(model)
    untied = [name for name, module in modules.items() if not module.tied]
    if untied:
        raise NotSupportedError(f"{untied[0]}: {_UNTIED_MERGE}")
    for name, module in modules.items():
        _set_module(model, name, module.merged())
    return model


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The same merge on a state dict (our names, tied adapters): drops `*.lora_A` / `*.lora_B`, updates
    `*.weight`."""
    if any(k.endswith((".encoder_lora_A", ".encoder_lora_B")) for k in state):
        raise NotSupportedError(_UNTIED_MERGE)
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            weight = state[module + ".weight"]
            delta = (state[module + ".lora_B"].float() @ state[key].float()) * scaling
            out[module + ".weight"] = (weight.float() + delta).to(weight.dtype)
    return out


# ------------------------------------------------------------------------------------------------ PEFT format
def hf_module_name(ours: str, pass_name: str) -> str:
    """Our module name -> the module that runs it in the given pass in transformers' model."""
    return HF_PREFIX[pass_name] + ours


def hf_module_names(ours: str) -> list[str]:
    """Our module name -> its name(s) in transformers' DiffusionGemmaForBlockDiffusion (decoder's first)."""
    return [hf_module_name(ours, p) for p in reversed(module_passes(ours))]


def _peft_key(hf_module: str, which: str) -> str:
    return f"{PEFT_PREFIX}{hf_module}.{which}.weight"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters in PEFT's names: each pass's adapter under the module that runs that pass."""
    state = {}
    for name, module in lora_modules(model).items():
        for pass_name in module_passes(name):
            adapter = module.adapter_for(pass_name)
            if adapter is not None:
                for which, tensor in zip(("lora_A", "lora_B"), adapter):
                    state[_peft_key(hf_module_name(name, pass_name), which)] = tensor
    return state


def _tied_state(lora_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": ..} (our names, one adapter for both passes) -> PEFT's names."""
    state = {}
    for key, tensor in lora_state.items():
        module, _, which = key.rpartition(".")
        if which in ("encoder_lora_A", "encoder_lora_B"):
            raise TrainError(f"{key}: an adapter that differs between the passes is saved from its model: "
                             "save_adapter(model, ...)")
        if which not in ("lora_A", "lora_B"):
            continue
        for pass_name in module_passes(module):
            state[_peft_key(hf_module_name(module, pass_name), which)] = tensor
    return state


def adapter_config(cfg: LoRAConfig, base_model: str | None, modules: list[str]) -> dict:
    """PEFT's adapter_config.json. `target_modules` lists the adapted modules by their full names (PEFT matches
    a list entry against the end of each module name), so PEFT wraps exactly the modules the file has weights
    for: never the vision tower, never a pass the adapter does not name."""
    return {
        "peft_type": "LORA", "task_type": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def peft_merge_targets(config: dict) -> list[str]:
    """For merging a tied adapter with PEFT: its `target_modules` without the encoder's copies, so PEFT adds
    each delta to the shared weight once (the decoder's module holds it; the encoder shares the weight)."""
    return [m for m in config["target_modules"] if not m.startswith(HF_PREFIX[ENCODER])]


def save_adapter(lora: nn.Module | dict[str, torch.Tensor], cfg: LoRAConfig, folder: str | Path,
                 base_model: str | None = None) -> Path:
    """Write an adapter in PEFT's format, through a temporary folder renamed into place. `lora` is a model
    with LoRA modules, or a state dict {"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]} (our names)
    of adapters that apply to both passes, as our training makes them."""
    named = adapter_state(lora) if isinstance(lora, nn.Module) else _tied_state(lora)
    # clone: safetensors refuses tensors that share memory
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in named.items()}
    if not state:
        raise TrainError("no LoRA parameters to save")
    modules = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] for k in state})
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, base_model, modules), indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is this a LoRA adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise NotSupportedError(f"{path}: peft_type {raw.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "use_qalora", "target_parameters",
                 "layer_replication", "trainable_token_indices", "alora_invocation_tokens"):
        if raw.get(flag):
            raise NotSupportedError(f"{path}: {flag} adapters are not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise NotSupportedError(f"{path}: per-module rank_pattern / alpha_pattern is not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise NotSupportedError(f"{path}: adapters with trained biases or modules_to_save are not supported")
    try:
        rank = int(raw["r"])
        return LoRAConfig(rank=rank, alpha=float(raw.get("lora_alpha", rank)),
                          dropout=float(raw.get("lora_dropout") or 0.0), target_modules=DEFAULT_TARGETS)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: needs a whole number r and a number lora_alpha ({e!r})") from None
    except TrainError as e:
        raise CheckpointError(f"{path}: {e}") from None


# transformers modules letterpress does not run: an adapter on them has nothing to change here.
_VISION_MODULES = (".vision_tower.", ".embed_vision.")


def _read_adapter_pairs(model: nn.Module, path: Path, cfg: LoRAConfig):
    """{our module: {pass: (A, B)}} from the adapter file; every tensor must find its module."""
    with _open(path) as f:
        try:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' own error types: a truncated file
            raise CheckpointError(f"{path}: cannot read its tensors, is the file truncated? ({e})") from None
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if any(isinstance(m, LoRALinear) for m in linear.values()):
        raise TrainError("the model already has LoRA adapters: load an adapter into a plain model")
    pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, module in linear.items():
        for pass_name in module_passes(name):
            hf = hf_module_name(name, pass_name)
            keys = [_peft_key(hf, "lora_A"), _peft_key(hf, "lora_B")]
            found = [k in stored for k in keys]
            if not any(found):
                continue
            if not all(found):
                raise CheckpointError(f"{path}: {keys[found.index(False)]} is missing (its pair is there)")
            a, b = stored.pop(keys[0]), stored.pop(keys[1])
            expected = ((cfg.rank, module.in_features), (module.out_features, cfg.rank))
            for key, tensor, shape in zip(keys, (a, b), expected):
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, expected {list(shape)} "
                                          f"(r={cfg.rank} in {ADAPTER_CONFIG})")
            pairs.setdefault(name, {})[pass_name] = (a, b)
    vision = [k for k in stored if any(v in k for v in _VISION_MODULES)]
    if vision:
        log.warning("%s: ignoring %d tensors that adapt the vision tower (letterpress runs text only)",
                    path, len(vision))
    other = sorted(set(stored) - set(vision))
    if other:
        raise NotSupportedError(f"{path}: {other[0]} (and {len(other) - 1} more) adapts no linear layer of the "
                                "text model letterpress runs (only q/k/v/o, dense MLP, router and "
                                "self-conditioning projections can carry adapters)")
    if not pairs:
        example = _peft_key(hf_module_name(next(iter(linear)), DECODER), "lora_A")
        raise CheckpointError(f"{path}: no tensor adapts a module of this model (expected keys like {example})")
    return pairs


def check_mergeable(folder: str | Path) -> None:
    """Refuse an adapter that differs between the passes from its files alone (before a base model is
    loaded to merge it into): every layer adapter must be stored for both passes, equal."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    enc, dec = HF_PREFIX[ENCODER], HF_PREFIX[DECODER]
    with _open(path) as f:
        keys = set(f.keys())
        for key in sorted(keys):
            name = key.removeprefix(PEFT_PREFIX)
            if name.startswith(enc):
                other = dec + name[len(enc):]
            elif name.startswith(dec) and not name.startswith(dec + "self_conditioning."):
                other = enc + name[len(dec):]
            else:
                continue
            other = PEFT_PREFIX + other
            if other not in keys or not torch.equal(f.get_tensor(key), f.get_tensor(other)):
                module = name.rsplit(".", 2)[0]
                raise NotSupportedError(f"{path}: {module}: {_UNTIED_MERGE}")


def refuse_quantized(folder: Path, config: dict, doing: str) -> None:
    """Refuse a quantized checkpoint before any work: its int8 / int4 / fp8 layers are buffers and LoRA wraps
    float layers only, so a full run would train just the embedding and norms (then fail to save), and a
    LoRA run or a merge would find no layer to adapt."""
    qc = config.get("quantization_config")
    if qc is None:
        return
    from ..quant import ct_formats

    formats = ", ".join(sorted(ct_formats(qc))) or str(qc.get("quant_method", "quantized"))
    hint = (" (the embedded tiny-tasks: `python -m letterpress.train.recipes_tasks unship DIR` writes it out in "
            "float32)" if folder.name == "tiny_tasks" else "")
    raise TrainError(f"{folder} is stored quantized ({formats}): {doing} needs its float weights (letterpress "
                     f"has no QLoRA); use the float checkpoint it was quantized from{hint}")


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Wrap the modules the adapter file covers and load its weights into them, keeping the encoder pass's
    and the decoder pass's adapters apart where they differ and applying none to a pass the file does not
    name. Returns the adapter's config (its target_modules: the adapted module types)."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    pairs = _read_adapter_pairs(model, path, cfg)
    cfg.target_modules = tuple(sorted({n.rpartition(".")[2] for n in pairs}))
    model.requires_grad_(False)
    # an engine serving `model` must not reuse prefix-cache blocks written with the weights before the adapter
    model.weights_version = getattr(model, "weights_version", 0) + 1
    for name, by_pass in pairs.items():
        runs = module_passes(name)
        adapters = [by_pass.get(p) for p in runs]
        tied = all(a is not None for a in adapters) and all(
            torch.equal(a[0], adapters[0][0]) and torch.equal(a[1], adapters[0][1]) for a in adapters)
        if tied:
            passes = BOTH
            a, b = adapters[0]
        elif DECODER in by_pass:
            passes = (DECODER,)
            a, b = by_pass[DECODER]
        else:
            passes = (ENCODER,)
            a, b = by_pass[ENCODER]
        lora = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, 0.0, passes)
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        if not tied and passes == (DECODER,) and ENCODER in by_pass:
            lora.set_encoder_adapter(*by_pass[ENCODER])
        _set_module(model, name, lora)
    model.requires_grad_(False)
    if not all(m.tied for m in lora_modules(model).values()):
        track_passes(model)
    return cfg
