"""CLIP's image transforms (open_clip `image_transform`): random-resized-crop for
training, resize + centre-crop for evaluation, both bicubic, then normalization.

normalization=None ends a transform at uint8 CHW pixels instead (`data.uint8_batches`):
the loader ships a quarter of the bytes and the trainer normalizes on its device with
`pipeline.pixels.normalize`, the same arithmetic as ToTensor + Normalize."""
from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from pipeline.model.configs import NORMALIZATION


def to_tensor(normalization: str | None) -> list:
    if normalization is None:
        return [T.PILToTensor()]
    mean, std = NORMALIZATION[normalization]
    return [T.ToTensor(), T.Normalize(mean, std)]


class Uint8ToFloat:
    """ToTensor's arithmetic on a uint8 CHW tensor (x / 255 in fp32): pipeline.pixels
    normalizes uint8 batches with the same operations, bit for bit."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).div(255)


def train_transform(image_size: int, normalization: str | None, rrc_scale: tuple[float, float] = (0.9, 1.0)):
    """CLIP's training crop (open_clip's RandomResizedCrop, bicubic), resized on the uint8
    tensor rather than the PIL image: torchvision v2's antialiased bicubic on uint8 runs
    SIMD kernels, and the resize was 3/4 of a worker's time per image with Pillow's (256 px
    img2dataset JPEGs to 224: 1.6x the images per core, `python -m bench.bench_decode`).
    The crop drawn is the same (the same draws from the same generator); the pixels differ
    from Pillow's by at most one level (the rounding of the same filter:
    tests/test_fast_paths.py)."""
    tail = [] if normalization is None else [Uint8ToFloat(), T.Normalize(*NORMALIZATION[normalization])]
    return T.Compose([
        T.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=rrc_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        *tail,
    ])


def eval_transform(image_size: int, normalization: str | None):
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        *to_tensor(normalization),
    ])


# ZeroVL's training views (zerovl/ZeroVL configs/clip/zerovl.yaml: random_resize_crop scale
# (0.6, 1.0), then autoaug = the ImageNet AutoAugment policy, grey fill 128). torchvision's
# AutoAugment(IMAGENET) is that policy; the crop is bicubic like our other train crops
# (ZeroVL's torchvision default is bilinear).
ZEROVL_CROP_SCALE = (0.6, 1.0)


def zerovl_transform(image_size: int, normalization: str | None):
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=ZEROVL_CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC),
        T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, fill=[128, 128, 128]),
        *to_tensor(normalization),
    ])


# RandomResizedCrop area ranges of the self-supervised recipes (the loader also sizes its
# JPEG draft decoding from them).
SSL_CROP_SCALES = {"simclr": (0.08, 1.0), "moco": (0.2, 1.0)}


def ssl_transform(image_size: int, normalization: str | None, kind: str = "simclr"):
    """The self-supervised views: SimCLR's recipe as SLIP uses it (`datasets.py`:
    RandomResizedCrop scale (0.08, 1)) or MoCo v2's as DeCLIP uses it (scale (0.2, 1));
    both then colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian
    blur sigma in [0.1, 2] with p 0.5 and a horizontal flip (DeCLIP's MoCo v2 views, Sense-GVT/DeCLIP
    prototype/data/datasets/clip_dataset.py; SLIP's SimCLR views, facebookresearch/SLIP main.py)."""
    scale = SSL_CROP_SCALES[kind]
    blur_kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, ~10% of the side (SimCLR)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        *to_tensor(normalization),
    ])
