"""Training: the diffusion SFT loss, the trainer (full fine-tuning, LoRA, FSDP2), data, recipes, and the BPE
tokenizer of letterpress's own small model (bpe.py).

    from letterpress.train import TrainConfig, Trainer, LoRAConfig, LossConfig
    result = Trainer(TrainConfig(model="ckpt", data="train.jsonl", lora=LoRAConfig(rank=8))).train()
"""

from .lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from .loss import DiffusionBatch, Example, LossConfig, make_batch, total_loss
from .trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["DiffusionBatch", "Example", "LoRAConfig", "LossConfig", "TrainConfig", "TrainResult", "Trainer",
           "apply_lora", "load_adapter", "make_batch", "merge_lora", "save_adapter", "total_loss", "train"]
