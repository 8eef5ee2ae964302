"""Processes under torchrun: this process's rank, the number of processes and its device.

Training splits each global batch across ranks (DistributedDataParallel averages the gradients); sampling splits
the images: rank r draws images [r n / size, (r + 1) n / size), each from its own generator, so the images do
not depend on the number of processes.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str | None = None, timeout: datetime.timedelta | None = None) -> World:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU).

    device_type: "cpu" or "cuda" to choose; None takes CUDA when it is available (cuda:LOCAL_RANK).
    timeout: how long a collective may wait for the other ranks (torch's default: 30 minutes for gloo)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)  # the *_object collectives of nccl use the current device
        dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, device=device)


TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def share(n: int, world: World) -> range:
    """The indices of the n items this rank handles: contiguous blocks whose sizes differ by at most one."""
    return range(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def agree_max(value: float, world: World) -> float:
    """The largest of every process's `value` (a collective call under torchrun; on the device nccl needs)."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
