"""Model FLOPs per sample, counted (not estimated) with torch's FlopCounterMode over one
forward and backward of the real architecture: the numerator of MFU."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .clip import build_model
from .configs import ModelArch
from .token_drop import tokens_kept


def train_flops_per_sample(arch: ModelArch, batch: int = 2, token_drop: float = 0.0) -> float:
    """FLOPs of forward + backward per image-text pair (matmuls, convolutions, attention),
    with the image tower on the kept tokens at `token_drop` (model.token_drop).

    Counted on a copy built on the meta device, never on the model being trained: a
    train-mode forward of that model moved its BatchNorm statistics on the counting rank
    alone, and DeepSpeed broadcasts parameters, not buffers, so ranks started apart. Meta
    tensors cost no memory, draw no random numbers, and send SDPA down its math path, so
    attention's matmuls are counted (on CPU the fused SDPA kernel has no FLOP formula and
    counted nothing). No grad checkpointing: MFU counts no recomputation."""
    with torch.device("meta"):
        model = build_model(arch)
        images = torch.empty(batch, 3, arch.image_size, arch.image_size)
        text = torch.empty(batch, arch.context_length, dtype=torch.long)
        keep = None
        if token_drop:
            keep = torch.empty(batch, tokens_kept(arch.grid_size ** 2, token_drop), dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, text, keep=keep)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    return counter.get_total_flops() / batch
