"""Multi-process training on torch.distributed, set up from the launcher's environment.

`torchrun` and `accelerate launch` both export RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address); the trainer only reads them, so it never fights the launcher's own
process setup. gloo serves CPUs (and CI), nccl GPUs. Rank 0 owns every file the run writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from simplified_slm.errors import SLMError

STRATEGIES = ("ddp", "fsdp")  # train.distributed: see shard_model for fsdp


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (the loss of the global batch)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a signal or time limit seen by one)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: with equal shards, DDP's gradient average is
        the gradient of the global batch's mean loss."""
        return batch.chunk(self.world_size)[self.rank] if self.enabled else batch

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Distributed, str]:
    """Join the process group the launcher described; returns the context and the device
    name this rank should use (`cuda:<local_rank>` on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device_name
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise SLMError(f"WORLD_SIZE={world} is set but MASTER_ADDR is not; start multi-process "
                           "training with torchrun or accelerate launch")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(rank, world, local, owns), device_name


# ------------------------------------------------------------------------ FSDP
def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """FSDP2 (`fully_shard`): each block is one unit, the rest (embeddings, head, final
    norm) the root unit; parameters become DTensors sharded over the ranks."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (a collective: every rank calls it; rank 0
    gets the tensors, as a checkpoint of a plain single-process run would hold them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return (get_model_state_dict(model, options=_full_options()),
            get_optimizer_state_dict(model, optimizer, options=_full_options()))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict) -> None:
    """Shard a full optimizer state dict (every rank read the same file) onto the ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
