"""Tensor and expert parallel serving on torch.distributed (README, "Multiple GPUs").

    shard.py     cut a loaded model into one rank's slice, with the collectives it needs
    vocab.py     the embedding / LM head / self-conditioning input over vocabulary slices, order keys
    sampler.py   the sampler's vocabulary passes on each rank's slice (per-position statistics reduced)
    runtime.py   start the ranks, rank 0 drives every model call and sampler step, the others follow
"""

from .runtime import Driver, LoadSpec, ParallelConfig, check_shardable, launch, load_shard
from .shard import Shard, kv_heads_of, shard_model

__all__ = ["Driver", "LoadSpec", "ParallelConfig", "Shard", "check_shardable", "kv_heads_of", "launch", "load_shard",
           "shard_model"]
