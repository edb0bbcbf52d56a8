"""More than one process: PyTorch's own stack (torchrun + FSDP2 `fully_shard`), and no-ops for one process.

    torchrun --nproc-per-node 8 -m letterpress.cli train ...          # one machine, 8 GPUs
    torchrun --nnodes 2 --node-rank R --master-addr HOST ... -m letterpress.cli train ...

Each decoder layer is its own FSDP unit (all-gathered for its forward, resharded after); the root unit holds
the embedding, final norm and self-conditioning block. Backend: NCCL on GPUs, gloo on CPU (tests run FSDP2 on
CPU with gloo). Every rank must run the same sequence of forwards, so the loss never skips a pass based on
its own rows' draws.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group if there is one.
    `device`: "cpu", "cuda" (-> cuda:LOCAL_RANK) or None (cuda when available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shard_model(module: nn.Module, layers: nn.ModuleList, env: DistEnv) -> nn.Module:
    """FSDP2: one unit per layer, then the root. Parameters become DTensors sharded over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over the ranks (float64, so counts stay exact)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group, while the interpreter is whole. After a clean finish (`clean`) every rank
    first waits at a barrier, so that no rank tears its connections down while a peer is still in a
    collective with it. Then whatever still holds collective work (the caller must have dropped the sharded
    model and optimizer: FSDP keeps work handles and their tensors) is collected, and the group is destroyed,
    which stops the backend's threads. Left to interpreter exit, a gloo thread can release such work after
    Python is gone and the process aborts ("terminate called without an active exception"). After an error
    there is no barrier: a peer may never reach it."""
    if not (env.distributed and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
