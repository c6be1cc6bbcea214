"""Text tower: OpenAI CLIP's causal transformer over BPE tokens
(openai/CLIP:clip/model.py, `encode_text`)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.tokenizer import EOT_ID

from .configs import ModelArch
from .layers import Block, LayerNorm, checkpointed


class TextTower(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        width = arch.text_width
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(arch.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(arch.context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, arch.text_heads, arch.mlp_ratio, arch.ln_eps, arch.activation) for _ in range(arch.text_layers))
        self.ln_final = LayerNorm(width, eps=arch.ln_eps)
        self.text_projection = nn.Parameter(torch.zeros(width, arch.embed_dim))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) token features after ln_final."""
        L = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:L]  # (B, L, D)
        for block in self.blocks:
            x = checkpointed(block, x, True, enabled=self.grad_checkpointing)
        return self.ln_final(x)

    @staticmethod
    def eot_positions(text: torch.Tensor) -> torch.Tensor:
        # The first EOT (the tokenizer keeps it even in truncated captions). CLIP's
        # `text.argmax(-1)` relies on EOT being the largest id, which DeCLIP's added mask
        # token (EOT + 1) breaks.
        return (text == EOT_ID).int().argmax(dim=-1)  # (B,)
