"""Multi-process (DistributedDataParallel) training support for `ssiu train`.

    torchrun --nproc_per_node 8 -m ssiu train --hr DF2K_HR --scale 4 ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; `setup()` joins the
process group (NCCL on CUDA, gloo on CPU) and returns this process's `Dist`. Data
sharding keeps the global batch identical to a one-process run: each step's batch is
the `PatchBatchSampler` batch of (seed, step), and rank r takes the r-th contiguous
slice of every micro-batch (`Dist.shard`). DDP averages gradients over the ranks, so
with equal slices the gradient is that of the whole batch, and the run (and its
checkpoint, written by rank 0 only) does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, keys: list, name: str = "batch") -> list:
        """This rank's contiguous slice of `keys` (len divisible by world_size)."""
        if len(keys) % self.world_size:
            raise ValueError(
                f"the {name} of {len(keys)} does not split evenly over {self.world_size} "
                "processes; use a batch size divisible by the process count"
            )
        per = len(keys) // self.world_size
        return keys[self.rank * per : (self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (itself without a process group)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def cleanup(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> Dist:
    """Join the process group torchrun described (or the one already set up).

    device_type: "cuda" picks NCCL and this rank's local GPU, "cpu" gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip
    if not launched():
        return Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)


__all__ = ["Dist", "launched", "setup"]
