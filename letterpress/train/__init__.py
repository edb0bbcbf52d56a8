"""Training: the diffusion SFT loss, the trainer (full fine-tuning, LoRA, FSDP2), data, recipes, and the BPE
tokenizer of letterpress's own small model (bpe.py).

    from letterpress.train import TrainConfig, Trainer, LoRAConfig, LossConfig
    result = Trainer(TrainConfig(model="ckpt", data="train.jsonl", lora=LoRAConfig(rank=8))).train()

The names below load on first use (PEP 562), so that `letterpress train --help` (train/command.py) imports no
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# public name -> the module (relative to this package) that defines it
_EXPORTS = {**dict.fromkeys(("LoRAConfig", "apply_lora", "load_adapter", "merge_lora", "save_adapter"), ".lora"),
            **dict.fromkeys(("DiffusionBatch", "Example", "LossConfig", "make_batch", "total_loss"), ".loss"),
            **dict.fromkeys(("TrainConfig", "Trainer", "TrainResult", "train"), ".trainer")}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
    from .loss import DiffusionBatch, Example, LossConfig, make_batch, total_loss
    from .trainer import TrainConfig, Trainer, TrainResult, train

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
