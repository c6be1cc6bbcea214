"""All-gather across data-parallel ranks that keeps autograd connected.

Every rank's features become columns of every other rank's logits, so the loss of
rank k depends on the features of rank r. The backward therefore sums the
gradients that all ranks computed for a slice and hands rank r its own slice
(a reduce-scatter): with DeepSpeed/DDP averaging gradients over ranks afterwards,
the result equals the gradient of one big-batch loss (tests/test_losses.py).

Exact accumulation (pipeline/train/engine.py) plays the ranks of a larger world inside one
process: under `virtual_rank` the gather returns columns cached from every micro-batch
and keeps the gradient they receive, which the caller sums over the virtual ranks as the
backward's all-reduce sums it over real ones. The per-rank arithmetic is then the same on
any topology (why that matters: docs/training.md, "Changing the number of GPUs mid-run").
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from pipeline.ranks import world


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rank, world_size = world()
        ctx.rank, ctx.world_size = rank, world_size
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))  # (W*B, ...)
        if dist.get_backend() == "nccl":
            dist.all_gather_into_tensor(out, x)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.chunk(world_size)), x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            local = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(local, grad)
            return local
        # gloo has no reduce-scatter: sum everything, keep our slice.
        dist.all_reduce(grad)
        return grad.chunk(ctx.world_size)[ctx.rank].clone()


class _VirtualGather(torch.autograd.Function):
    """Forward: the cached columns of every virtual rank. Backward: the columns' gradient
    goes to `received` (summed over virtual ranks by the caller), none to `x` directly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, columns: torch.Tensor, received: list) -> torch.Tensor:
        ctx.received = received
        return columns.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.received.append(grad)
        return None, None, None


class VirtualRank:
    """Rank `rank` of `size` played in this process: `columns` maps each local tensor a loss
    will gather (by identity) to its (size*B, ...) columns in virtual-rank order;
    `received[x]` collects the gradients those columns get."""

    def __init__(self, rank: int, size: int, columns: dict[int, torch.Tensor]):
        self.rank, self.size, self.columns = rank, size, columns
        self.received = {key: [] for key in columns}

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self.columns:
            raise RuntimeError("exact accumulation: a loss term gathered a tensor it was not given the columns of "
                               "(only the pooled image/text features are cached)")
        return _VirtualGather.apply(x, self.columns[id(x)], self.received[id(x)])

    def column_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The gradient the columns gathered for `x` received, summed; zeros if none."""
        got = self.received[id(x)]
        return sum(got[1:], got[0]) if got else torch.zeros_like(self.columns[id(x)])


_playing: VirtualRank | None = None


@contextlib.contextmanager
def virtual_rank(rank: int, size: int, columns: dict[int, torch.Tensor]):
    """Inside, the losses score as rank `rank` of `size` (see VirtualRank)."""
    global _playing
    outer, _playing = _playing, VirtualRank(rank, size, columns)
    try:
        yield _playing
    finally:
        _playing = outer


def loss_group() -> tuple[int, int]:
    """(rank, size) of the group a loss's rows and columns belong to: the virtual rank being
    played, else the process's place in the data-parallel group."""
    return (_playing.rank, _playing.size) if _playing is not None else world()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, differentiable; identity without a group."""
    if _playing is not None:
        return _playing.gather(x)
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def local_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """(B,) the columns of this rank's own rows among the gathered W*B (rank order): the
    positives of every loss that scores local rows against all-gathered columns."""
    return torch.arange(batch_size, device=device) + loss_group()[0] * batch_size
