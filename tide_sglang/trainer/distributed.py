"""Data-parallel training under `torchrun`: PyTorch's DistributedDataParallel, one stream consumer per rank.

Each rank reads its own share of the stream (consumer `<name>-<rank>` in the one group), keeps its own replay
buffer and checkpoint (`<dir>/rank-<r>`), and DDP averages gradients. The ranks agree, once per loop, on whether
to train and whether to go on (so a signal on one rank stops all of them between steps), and they choose a new
lineage's vocabulary from the summed token counts. Rank 0 alone evaluates and publishes.
"""

import os

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict


class Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist | None:
    """The process group `torchrun` describes (WORLD_SIZE > 1), initialised once; None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise AND of boolean flags over all ranks (one all-reduce; NCCL wants `device` to be the GPU)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def summed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = t.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def broadcast_int(value: int | None, device: torch.device) -> int | None:
    """Rank 0's value (None included) on every rank."""
    t = torch.tensor([-1 if value is None else value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    out = int(t.item())
    return None if out < 0 else out
