"""CLIP's image transforms (open_clip `image_transform`): random-resized-crop for
training, resize + centre-crop for evaluation, both bicubic, then normalization."""
from __future__ import annotations

from torchvision import transforms as T

from pipeline.model.configs import NORMALIZATION


def train_transform(image_size: int, normalization: str, rrc_scale: tuple[float, float] = (0.9, 1.0)):
    mean, std = NORMALIZATION[normalization]
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=rrc_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int, normalization: str):
    mean, std = NORMALIZATION[normalization]
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
