"""Pixels in a batch, as the loader ships them and the model takes them.

With `data.uint8_batches` the loader's workers ship uint8 pixels (a quarter of float32's
bytes through worker IPC and the host-to-device copy) and the trainer normalizes them on
its device with `normalize`, bit for bit the arithmetic of ToTensor + Normalize. This
module sits below both the data package and the engine, so neither imports the other.
"""
from __future__ import annotations

import torch

from pipeline.model.configs import NORMALIZATION

# batch keys that hold pixels the model sees: images, images_1, ssl_0, ssl_1, ...
PIXEL_KEYS = ("images", "ssl_")


def normalize(pixels: torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32, bit for bit what ToTensor + Normalize give on the
    same pixels (same operations in the same order), on whatever device `pixels` is."""
    mean, std = (torch.tensor(v, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
                 for v in NORMALIZATION[normalization])
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def pixels_on_device(batch: dict, device: torch.device) -> dict:
    """The trainer's half of `data.uint8_batches`: a batch whose image tensors are uint8
    (it names its normalization) with each copied to `device` (non-blocking: the loader
    pins its batches when there is a GPU) and normalized there. A float batch is returned
    as it is."""
    name = batch.get("normalization")
    if name is None:
        return batch
    return {k: normalize(v.to(device, non_blocking=True), name) if k.startswith(PIXEL_KEYS) else v
            for k, v in batch.items() if k != "normalization"}
