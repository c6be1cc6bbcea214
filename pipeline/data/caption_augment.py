"""Caption augmentations on CLIP token ids: DeCLIP's MLM masking (`mlm_mask`, BERT's
80/10/10) and ZeroVL's caption augmentation (Cui et al. 2022; zerovl/ZeroVL
`zerovl/datasets/clip/utils.py::process_caption`): every training caption
has 20% of its tokens selected; of those, 50% become the mask token, 10% a random token,
and the other 40% are deleted (the reference's comment says "keep"; its code deletes).

Decisions: the reference works on BERT word-pieces of the caption string and joins them
back into words before tokenizing again; we work on the CLIP BPE ids the loader already
has (SOT and EOT never selected, deleted tokens close up, padding refills the end), with
DeCLIP's mask token (id 49408, so the text tower gets one more vocabulary row) and random
ids drawn from the ordinary tokens, as our MLM masking does. The caption is truncated to
the context length before the deletions, so deletions leave padding rather than letting
more of a long caption in.
"""
from __future__ import annotations

import torch

from pipeline.tokenizer import EOT_ID, IGNORE_INDEX, MASK_ID, SOT_ID

SELECT, MASK, RANDOM = 0.20, 0.50, 0.10  # selected; of those, masked and random (the rest deleted)


def zerovl_augment(text: torch.Tensor, generator: torch.Generator | None = None,
                   mask_id: int = MASK_ID) -> torch.Tensor:
    """(B, L) token ids -> (B, L) augmented ids, the same padding convention (0 after EOT)."""
    positions = torch.arange(text.shape[1])[None]
    eot = (text == EOT_ID).int().argmax(dim=1, keepdim=True)
    candidates = (positions < eot) & (text != SOT_ID)
    draw = torch.rand(text.shape, generator=generator) / SELECT  # < 1 for the selected tokens
    random_ids = torch.randint(0, SOT_ID, text.shape, generator=generator)
    selected = candidates & (draw < 1)
    out = torch.where(selected & (draw < MASK), torch.full_like(text, mask_id), text)
    out = torch.where(selected & (draw >= MASK) & (draw < MASK + RANDOM), random_ids, out)
    keep = ~(selected & (draw >= MASK + RANDOM))
    closed = torch.zeros_like(text)
    for row, (ids, kept) in enumerate(zip(out, keep)):
        ids = ids[kept]
        closed[row, :len(ids)] = ids
    return closed


def mlm_mask(text: torch.Tensor, mask_id: int = MASK_ID, prob: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking on CLIP token ids: `prob` of the real tokens (never SOT, EOT or the
    padding after EOT) are selected; of those 80% become `mask_id`, 10% a random
    ordinary token, 10% stay. Returns the masked ids and the labels (the original id at
    selected positions, IGNORE_INDEX elsewhere)."""
    positions = torch.arange(text.shape[1], device=text.device)[None]
    eot = (text == EOT_ID).int().argmax(dim=1, keepdim=True)  # first EOT; padding lies after it
    candidates = (positions < eot) & (text != SOT_ID)
    draw = torch.rand(text.shape, generator=generator, device=text.device)
    selected = candidates & (draw < prob)
    action = torch.rand(text.shape, generator=generator, device=text.device)
    random_ids = torch.randint(0, SOT_ID, text.shape, generator=generator, device=text.device)  # ordinary tokens
    masked = torch.where(selected & (action < 0.8), torch.full_like(text, mask_id), text)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = torch.where(selected, text, torch.full_like(text, IGNORE_INDEX))
    return masked, labels
