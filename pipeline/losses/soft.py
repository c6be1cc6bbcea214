"""Contrastive losses with other targets than the identity: PyramidCLIP's softened
negatives and ZeroVL's two-target mixup (PyramidCLIP, Gao et al., NeurIPS 2022,
arXiv 2204.14095, sec. 3.3; ZeroVL, Cui et al., ECCV 2022, arXiv 2112.09331, sec. 3.3 and
zerovl/ZeroVL zerovl/models/criteria/losses/mml_loss.py). Both are local rows
against all-gathered columns (gradient through the gather), like `contrastive_loss`,
and both reduce to it exactly (epsilon 0; mixup weight 1).
"""
from __future__ import annotations

import torch

from .gather import all_gather_with_grad, local_labels


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _global_logits(image_features, text_features, logit_scale):
    """(B, W*B) logits both ways and each local row's global column index."""
    B = image_features.shape[0]
    all_image = all_gather_with_grad(image_features)
    all_text = all_gather_with_grad(text_features)
    labels = local_labels(B, image_features.device)
    return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T, labels


def softened_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                              epsilon: float) -> torch.Tensor:
    """PyramidCLIP's softened negatives as a label-smoothing form: the paired sample gets
    target 1 - epsilon, each of the N - 1 negatives epsilon / (N - 1) (N = global batch),
    cross-entropy both ways, averaged. Decision (PyramidCLIP's released code has no
    loss, and the paper does not give epsilon): this is the form its sec. 3.3 describes;
    epsilon is a config value."""
    logits_i, logits_t, labels = _global_logits(image_features, text_features, logit_scale)
    n = logits_i.shape[1]
    off = epsilon / (n - 1) if n > 1 else 0.0
    targets = torch.full_like(logits_i, off).scatter_(1, labels[:, None], 1 - epsilon)
    return (_soft_cross_entropy(logits_i, targets) + _soft_cross_entropy(logits_t, targets)) / 2


def mixup_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                           alpha: float) -> torch.Tensor:
    """ZeroVL's two-target loss for a mixed batch (one side is alpha x own + (1 - alpha) x
    the reversed local batch): per direction alpha x CE(logits, y) + (1 - alpha) x
    CE(logits, flip(y)), y this rank's global indices, flip(y) the same reversed."""
    logits_i, logits_t, labels = _global_logits(image_features, text_features, logit_scale)
    flipped = labels.flip(0)

    def two_target(logits):
        logp = logits.log_softmax(dim=-1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return -(alpha * logp[rows, labels] + (1 - alpha) * logp[rows, flipped]).mean()

    return (two_target(logits_i) + two_target(logits_t)) / 2
