"""FILIP's token-wise late interaction (Yao et al. 2022), with the token selection of the
CLIP-Benchmark re-implementation (Sense-GVT/DeCLIP `prototype/model/filip.py`):
FILIP (Yao et al., ICLR 2022, arXiv 2111.07783), sec. 3.1.

similarity image i -> text j: mean over i's tokens of the max over j's tokens of the dot
product; text j -> image i: mean over j's (non-padding) tokens of the max over i's
tokens. Features are L2-normalized token embeddings in a small joint space. With
`top_k`, each sample first keeps the k tokens most similar to its own pair, and only
those are all-gathered as keys (the queries stay all local tokens): the communication
and the (B, n, W*B, k) similarity tensor shrink from n to k tokens a sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import all_gather_with_grad, local_labels


def token_similarity(queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """(Bq, n, D), (Bq, n) bool, (Bk, m, D), (Bk, m) bool -> (Bq, Bk): for each pair, the
    mean over valid query tokens of the max over valid key tokens."""
    sim = torch.einsum("qnd,kmd->qnkm", queries, keys)  # (Bq, n, Bk, m)
    sim = sim.masked_fill(~key_mask[None, None], float("-inf"))
    best = sim.max(dim=-1).values  # (Bq, n, Bk)
    weights = query_mask.to(best.dtype)[..., None]  # (Bq, n, 1)
    best = best.masked_fill(weights == 0, 0.0)
    return (best * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def select_tokens(tokens: torch.Tensor, mask: torch.Tensor, paired: torch.Tensor, paired_mask: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's k valid tokens with the largest summed similarity to its pair's
    valid tokens: (B, n, D) -> (B, k, D) and their validity (B, k) (False where a
    sample has fewer than k valid tokens)."""
    with torch.no_grad():
        score = torch.einsum("bnd,bmd->bnm", tokens, paired)  # (B, n, m)
        score = (score * paired_mask[:, None, :].to(score.dtype)).sum(-1)  # (B, n)
        score = score.masked_fill(~mask, float("-inf"))
        index = score.topk(min(k, tokens.shape[1]), dim=1).indices  # (B, k)
    chosen = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    return chosen, mask.gather(1, index)


def filip_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               logit_scale: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """image_tokens (B, n, D), text_tokens (B, m, D): L2-normalized local token embeddings;
    text_mask (B, m) True on real tokens (padding excluded); logit_scale: FILIP's own
    (exp'd) scale. Symmetric InfoNCE over the global batch on the token-wise similarities."""
    B = image_tokens.shape[0]
    image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
    image_keys, image_key_mask, text_keys, text_key_mask = image_tokens, image_mask, text_tokens, text_mask
    if top_k:
        image_keys, image_key_mask = select_tokens(image_tokens, image_mask, text_tokens, text_mask, top_k)
        text_keys, text_key_mask = select_tokens(text_tokens, text_mask, image_tokens, image_mask, top_k)
    all_image = all_gather_with_grad(image_keys)  # (W*B, k, D)
    all_text = all_gather_with_grad(text_keys)
    all_image_mask = all_gather_with_grad(image_key_mask.float()).bool()  # masks carry no gradient
    all_text_mask = all_gather_with_grad(text_key_mask.float()).bool()
    logits_i2t = logit_scale * token_similarity(image_tokens, image_mask, all_text, all_text_mask)  # (B, W*B)
    logits_t2i = logit_scale * token_similarity(text_tokens, text_mask, all_image, all_image_mask)  # (B, W*B)
    labels = local_labels(B, image_tokens.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
