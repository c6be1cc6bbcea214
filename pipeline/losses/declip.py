"""DeCLIP's extra supervision (Li et al. 2022; Sense-GVT/DeCLIP `prototype/model/declip.py`,
ICLR 2022, arXiv 2110.05208, sec. 3.2): masked language modelling on the text tower, SimSiam on image
embeddings, and nearest-neighbour supervision from a FIFO text-feature queue.

Building blocks only; the trainer composes them through pipeline/objectives.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenizer import IGNORE_INDEX

from .gather import all_gather_with_grad, local_labels

# ---- masked language modelling (the masking itself: pipeline/data/caption_augment.py) ----

def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the selected positions; logits (..., V), labels (...).
    Nothing selected (tiny batches) gives 0 with a zero gradient, not NaN. Written as a sum
    over a clamped count rather than a branch on `.any()`: no host sync per step, and no
    data-dependent branch (the fake-device tier runs it)."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


# ---- SimSiam ---------------------------------------------------------------------------

class SimSiamHead(nn.Module):
    """DeCLIP's sizes on a 512-d image embedding: projector Linear 512->1024, BN, ReLU,
    Linear 1024->1024, BN, ReLU, Linear 1024->1024, BN (affine: DeCLIP's
    `projection_MLP.bn3 = BN(hidden_dim)`; SimSiam's paper drops the affine there, DeCLIP
    does not); predictor Linear 1024->512, BN,
    ReLU, Linear 512->1024 (dims scale with the arguments)."""

    def __init__(self, in_dim: int, proj_dim: int = 1024, pred_dim: int = 512):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim))

    def forward(self, view_1: torch.Tensor, view_2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(view_1), self.projector(view_2)
        return simsiam_loss(self.predictor(z1).float(), self.predictor(z2).float(), z1.float(), z2.float())


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2, averaged over the batch."""
    return -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean() +
             F.cosine_similarity(p2, z1.detach(), dim=-1).mean()) / 2


# ---- nearest-neighbour supervision ----------------------------------------------------------

def nn_loss(image_features: torch.Tensor, neighbours: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Image -> nearest-neighbour text InfoNCE (DeCLIP's L_NN for one (image view, text
    view) pair): each local image against every rank's neighbours, its own as the positive.
    image_features (B, E) and neighbours (B, E) normalized; the neighbours carry no gradient."""
    all_neighbours = all_gather_with_grad(neighbours.detach())  # (W*B, E)
    logits = logit_scale * image_features @ all_neighbours.T  # (B, W*B)
    labels = local_labels(image_features.shape[0], image_features.device)
    return F.cross_entropy(logits, labels)


class FeatureQueue(nn.Module):
    """A per-rank FIFO of L2-normalized features (DeCLIP's NNCLR-style memory bank, 65,536
    text features by default), initialised to random unit vectors. Buffers, so DeepSpeed
    checkpoints and restores them with the model."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """The queue entry most cosine-similar to each (normalized) query: (B, D) -> (B, D).
        Call before `push` of the same batch: a sample must not find itself."""
        index = (queries.float() @ self.features.T.float()).argmax(dim=1)
        return self.features[index].to(queries.dtype)

    @torch.no_grad()
    def push(self, batch: torch.Tensor):
        """Enqueue (overwriting the oldest entries, wrapping around)."""
        n, size = batch.shape[0], self.features.shape[0]
        index = (self.pointer + torch.arange(n, device=batch.device)) % size
        self.features[index] = F.normalize(batch.detach().float(), dim=-1).to(self.features.dtype)
        self.pointer.copy_((self.pointer + n) % size)
