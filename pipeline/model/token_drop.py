"""Token dropping during pre-training (FLIP: Li et al., "Scaling Language-Image Pre-training
via Masking", CVPR 2023, arXiv 2212.00794; open_clip's `patch_dropout`): each image sees
a uniformly random subset of its patch tokens, the CLS token always, so the image tower
runs on (1 - p) of its tokens.

Which tokens a sample keeps is drawn where its crops are drawn: in the loader, from the
sample's own seed (pipeline/data/samples.py), and travels in the batch as `token_keep`
(B, k) indices into the patch grid, ascending. So the draw is the same on any number of
processes, workers and accumulation steps, a resumed run draws what the straight one did,
and exact accumulation's two passes over a micro-batch (pipeline/train/engine.py) see the same
tokens without any random state on the device.
"""
from __future__ import annotations

import torch


def tokens_kept(num_tokens: int, drop: float) -> int:
    """Patch tokens an image keeps at drop rate `drop` (open_clip's PatchDropout rounding:
    at least one)."""
    return max(1, int(num_tokens * (1 - drop)))


def draw_keep(num_tokens: int, drop: float, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random subset of tokens_kept(num_tokens, drop) patch positions, ascending
    (k,): every subset of that size equally likely (a random permutation's first k)."""
    keep = torch.randperm(num_tokens, generator=generator)[:tokens_kept(num_tokens, drop)]
    return keep.sort().values


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens, (B, k) positions -> (B, k, D), the kept tokens in position order."""
    return tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_grid(tokens: torch.Tensor, keep: torch.Tensor, positions: int) -> torch.Tensor:
    """(B, k, D) kept tokens -> (B, D, positions) with zeros where a token was dropped."""
    B, _, D = tokens.shape
    grid = tokens.new_zeros(B, positions, D)
    grid = grid.scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), tokens)
    return grid.transpose(1, 2)
