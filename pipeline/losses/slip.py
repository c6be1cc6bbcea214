"""SLIP's self-supervised term (Mu et al. 2022; facebookresearch/SLIP `losses.SIMCLRLoss`):
NT-Xent between two augmented views, gathered across ranks with gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import all_gather_with_grad, local_labels


def simclr_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """view_a, view_b: (B, D) head outputs of two views of the same local images (not yet
    normalized). For each view of each sample the positive is its other view; the
    negatives are every other view in the global batch (2*W*B - 2 of them), itself
    excluded. Mean of the two directions, as SLIP."""
    B = view_a.shape[0]
    q_a, q_b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
    k_a, k_b = all_gather_with_grad(q_a), all_gather_with_grad(q_b)  # (W*B, D)
    labels = local_labels(B, q_a.device)
    self_mask = F.one_hot(labels, k_a.shape[0]).to(q_a.dtype) * 1e9  # a view is not its own negative
    logits_ab, logits_ba = q_a @ k_b.T / temperature, q_b @ k_a.T / temperature  # (B, W*B)
    logits_aa, logits_bb = q_a @ k_a.T / temperature - self_mask, q_b @ k_b.T / temperature - self_mask
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2
