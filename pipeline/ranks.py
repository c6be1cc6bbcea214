"""The process's place in the data-parallel group, in one helper (losses, checkpoints,
the stream's counters and the trainer's agreements all ask it)."""
from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
