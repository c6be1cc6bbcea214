"""Transformer building blocks shared by both towers.

Follows OpenAI CLIP's `ResidualAttentionBlock` (openai/CLIP:clip/model.py): pre-LN,
fused QKV, QuickGELU MLP with 4x expansion (nn.GELU for open_clip's LAION models). The parameter layout is the one
MS-CLIP shares (Hxyou/MSCLIP:lib/models/clip_openai_pe_res_v1.py): `attn`
(fused QKV weight+bias and out-projection) and `mlp` (c_fc, c_proj) are
modality-free modules that can be the same object in both towers, while `ln_1`
and `ln_2` stay per modality. The causal mask is an argument of the call, not
state of the module, so one shared attention serves the causal text pathway and
the bidirectional vision pathway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input's dtype (CLIP's); MS-CLIP uses
    eps=1e-12.

    CLIP writes it as `layer_norm(x.float()).to(x.dtype)`. When the input and the weights
    are both bf16/fp16 (DeepSpeed's bf16 engine), PyTorch's kernels already accumulate the
    statistics and compute the affine output in fp32 and round once (CPU and CUDA), so the
    explicit round trip adds only two casts over the activations per LayerNorm (four
    LayerNorm-sized kernels per block in the step) for the same numbers up to one rounding
    step (tests/test_model.py). Mixed dtypes (autocast over fp32 weights) keep the fp32
    computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in the dtype of its running statistics (fp32 unless something
    cast the buffers) and cast back: batch_norm refuses mixed dtypes, and a low-precision
    engine may hold bf16 weights beside fp32 statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        momentum = self.momentum
        if momentum is None:  # cumulative average, as nn.BatchNorm2d does
            momentum = 1.0 / float(self.num_batches_tracked) if self.training else 0.0
        y = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, self.weight.to(dtype), self.bias.to(dtype),
                         self.training or not self.track_running_stats, momentum, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, through SDPA
    (flash / memory-efficient kernels on GPU, the fused CPU kernel here)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """key_mask (B, N) bool: which tokens may be attended to (PyramidCLIP's ROI padding)."""
        B, N, D = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        if mask is not None and causal:  # SDPA takes one or the other: combine them
            mask = mask & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, N, D/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str = "quick_gelu"):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ln_eps: float, activation: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, key_mask)
        return x + self.mlp(self.ln_2(x))


def checkpointed(module: nn.Module, *args, enabled: bool):
    """Call `module(*args)`, recomputing its activations in backward when enabled
    and grads are on (non-reentrant, so it composes with DeepSpeed ZeRO)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
