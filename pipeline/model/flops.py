"""Model FLOPs per sample, counted (not estimated) with torch's FlopCounterMode over one
forward and backward of the real model: the numerator of MFU."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .clip import SharedCLIP


def train_flops_per_sample(model: SharedCLIP, batch: int = 2) -> float:
    """FLOPs of forward + backward per image-text pair (matmuls, convolutions, attention)."""
    arch = model.arch
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, arch.image_size, arch.image_size, device=device)
    text = torch.randint(1, 49405, (batch, arch.context_length), device=device)
    text[:, -1] = 49407  # EOT
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, text)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch
