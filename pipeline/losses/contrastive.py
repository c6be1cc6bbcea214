"""Symmetric InfoNCE with a learnable temperature (CLIP, Radford et al. 2021;
open_clip's `ClipLoss` is the parity reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import all_gather_with_grad, loss_group


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     local_loss: bool = True) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the global batch.

    image_features, text_features: (B, E) L2-normalized local features.
    logit_scale: exp of the learnable log-scale, already clamped to <= 100 by the model.
    local_loss: each rank scores only its own B rows against all W*B columns, so memory
        is O(B x W*B) rather than O((W*B)^2); the averaged gradient is the same.
    """
    all_image = all_gather_with_grad(image_features)  # (W*B, E)
    all_text = all_gather_with_grad(text_features)  # (W*B, E)
    return gathered_contrastive_loss(image_features, text_features, all_image, all_text, logit_scale, loss_group()[0],
                                     local_loss)


def gathered_contrastive_loss(image_features, text_features, all_image, all_text, logit_scale, rank: int,
                              local_loss: bool = True) -> torch.Tensor:
    """The loss once the features are gathered (bench/bench_loss_memory.py measures it for
    any world size in one process)."""
    B = image_features.shape[0]
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T  # (B, W*B)
        logits_per_text = logit_scale * text_features @ all_image.T  # (B, W*B)
        labels = torch.arange(B, device=image_features.device) + rank * B
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (W*B, W*B)
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
