"""All-gather across data-parallel ranks that keeps autograd connected.

Every rank's features become columns of every other rank's logits, so the loss of
rank k depends on the features of rank r. The backward therefore sums the
gradients that all ranks computed for a slice and hands rank r its own slice
(a reduce-scatter): with DeepSpeed/DDP averaging gradients over ranks afterwards,
the result equals the gradient of one big-batch loss (tests/test_losses.py).
"""
from __future__ import annotations

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


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, differentiable; identity without a group."""
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def local_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """(B,) the columns of this rank's own rows among the gathered W*B (rank order): the
    positives of every loss that scores local rows against all-gathered columns."""
    return torch.arange(batch_size, device=device) + world()[0] * batch_size
