"""The process's place in the data-parallel group, in one helper (losses, checkpoints,
the stream's counters and the trainer's agreements all ask it)."""
from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(timeout):
    """deepspeed.init_distributed, with one repair for torchrun's restarts. torch 2.14's
    elastic agent serves every rendezvous round of a job from one store, so the keys the
    previous round's ranks wrote (gloo's addresses) are still there when the group starts
    again, and a restarted rank read a dead peer's address (connection refused) or waited
    forever: most restarts failed or hung in `python -m bench.torchrun_restarts`
    (bench/RESULTS.md). A prefix per TORCHELASTIC_RESTART_COUNT is not enough: a node that
    leaves or joins restarts the group without counting it, and the agents then count
    differently. So under torchrun rank 0 opens a fresh store of its own for each start
    of the group and names its port in the agent's store; the others connect to it (an
    older round's port belongs to a process that is gone, and refuses: read again)."""
    import os

    import deepspeed
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(get_accelerator().communication_backend_name(),
                                store=_fresh_store(rank, world_size, timeout), rank=rank, world_size=world_size,
                                timeout=timeout)
    deepspeed.init_distributed(timeout=timeout)  # adopts a group that exists


def _fresh_store(rank: int, world_size: int, timeout) -> "dist.Store":
    import os
    import time
    from datetime import timedelta
    host = os.environ["MASTER_ADDR"]
    agent = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        agent.set("msclip/store_port", str(store.port))
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port = int(agent.get("msclip/store_port"))  # waits until rank 0 of some round wrote it
        try:
            return dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=5))
        except (RuntimeError, dist.DistError):  # an older round's store: gone
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
