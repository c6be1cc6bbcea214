"""Image tower: ViT (OpenAI CLIP) with MS-CLIP-S's Early Specialization and
Efficient Parallel Branch.

References: openai/CLIP:clip/model.py (VisionTransformer) and
Hxyou/MSCLIP:lib/models/clip_openai_pe_res_v1.py (`EarlyconvRes`,
`ResBasicBlock_v0`, `Resnet_Stage`/`ConvResBlock`, `Lateral_Adapter`), as
MS-CLIP's sec. 3.2-3.3 (Early Specialization, Efficient Parallel Branch) describe them.
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import ModelArch
from .layers import BatchNorm2d, Block, LayerNorm, checkpointed
from .token_drop import gather_tokens, scatter_grid


class PatchDepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution whose kernel equals its stride, without padding (the lateral
    adapters' branch-to-grid convolution: kernel and stride 16, 8, 4 at B/32): each output
    is one channel's non-overlapping K x K patch, weighted and summed. Computed as that sum,
    a reshape and one batched contraction per channel, instead of a convolution kernel: the
    depthwise large-kernel convolution's backward was msclip-s-b32's largest convolution
    cost (148 of its 330 ms of convolution backward per bf16 CPU step, bench/RESULTS.md),
    for a few MFLOPs. The weight keeps Conv2d's (C, 1, K, K) layout and name, so every
    checkpoint and the reference's state dict load as before; the arithmetic is the
    convolution's up to summation order (tests/test_model.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        K = self.kernel_size[0]
        h, w = H // K, W // K  # the convolution's floor: a remainder row or column is not read
        patches = x[:, :, :h * K, :w * K].reshape(B, C, h, K, w, K)
        return torch.einsum("bchuwv,cuv->bchw", patches, self.weight[:, 0])


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bn_eps: float = 1e-5,
            padding: int | None = None) -> nn.Sequential:
    """Bias-free conv + BN; 'same' padding unless given."""
    padding = kernel // 2 if padding is None else padding
    patchwise = groups == c_in == c_out and kernel == stride and padding == 0
    conv = (PatchDepthwiseConv2d if patchwise else nn.Conv2d)(c_in, c_out, kernel, stride, padding=padding,
                                                                 groups=groups, bias=False)
    return nn.Sequential(conv, BatchNorm2d(c_out, eps=bn_eps))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, patch_size, patch_size, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)  # (B, D, h, w)


class StemStage(nn.Module):
    """MS-CLIP's `ResBasicBlock_v0`: relu(BN(conv3x3_s(x)) + BN(conv1x1_s(x))), one 3x3 conv."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv3 = conv_bn(c_in, c_out, 3, stride)
        self.conv1 = conv_bn(c_in, c_out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(x) + self.conv1(x))


class EarlyConvStem(nn.Module):
    """Early Specialization: replaces the patch embedding and transformer layer 0.
    Channels width/16 -> width/8 -> ... -> width; output stride 2 x prod(strides)."""

    def __init__(self, width: int, strides: tuple[int, ...]):
        super().__init__()
        c = width // 16
        self.conv1 = nn.Sequential(conv_bn(3, c, 3, 2), nn.ReLU(inplace=True))
        channels = [c * 2 ** i for i in range(len(strides) + 1)]
        self.stages = nn.Sequential(*[StemStage(a, b, s) for a, b, s in zip(channels, channels[1:], strides)])
        self.last_conv = nn.Conv2d(channels[-1], width, 1, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.last_conv(self.stages(self.conv1(image)))  # (B, D, h, w)


class BranchBottleneck(nn.Module):
    """MS-CLIP's `ConvResBlock`: 1x1 -> 3x3 (stride) -> 1x1 bottleneck with a strided
    1x1 projection shortcut; BN eps 1e-6 as in the reference."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // 2
        self.body = nn.Sequential(
            conv_bn(c_in, mid, 1, 1, bn_eps=1e-6), nn.ReLU(inplace=True),
            conv_bn(mid, mid, 3, stride, bn_eps=1e-6), nn.ReLU(inplace=True),
            conv_bn(mid, c_out, 1, 1, bn_eps=1e-6),
        )
        self.shortcut = conv_bn(c_in, c_out, 1, stride, bn_eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ParallelBranch(nn.Module):
    """Efficient Parallel Branch: stage 0 is conv3x3+BN+ReLU on the raw image, later
    stages one bottleneck each; channels width/16 x (1, 2, 4, ...). Stage 0's BN keeps
    PyTorch's default eps 1e-5 (the reference's `build_conv_bn_relu`); the bottlenecks'
    are 1e-6 (its `ConvResBlock`)."""

    def __init__(self, width: int, strides: tuple[int, ...]):
        super().__init__()
        self.channels = [width // 16 * 2 ** i for i in range(len(strides))]
        stages = [nn.Sequential(conv_bn(3, self.channels[0], 3, strides[0]), nn.ReLU(inplace=True))]
        stages += [BranchBottleneck(a, b, s) for a, b, s in zip(self.channels, self.channels[1:], strides[1:])]
        self.stages = nn.ModuleList(stages)


class LateralAdapter(nn.Module):
    """Fuses one branch stage into the token stream (MS-CLIP's `Lateral_Adapter`).

    The token sequence is *replaced* (no identity term, as in the reference):
        t2b  = PW(BN(DW_{k=s=K}(branch)))          # branch -> token grid, width channels
        grid = BN(DW3x3(patch tokens as an h x w map))
        out  = LN(cat[cls + cls, grid + t2b])       # PRALLEL_T2B_USECLS: cls added to itself
    """

    def __init__(self, c_branch: int, width: int, kernel: int, ln_eps: float):
        super().__init__()
        self.to_grid = nn.Sequential(conv_bn(c_branch, c_branch, kernel, kernel, groups=c_branch, padding=0),
                                     nn.Conv2d(c_branch, width, 1, bias=False))
        self.token_dw = conv_bn(width, width, 3, 1, groups=width)
        self.ln = LayerNorm(width, eps=ln_eps)

    def forward(self, tokens: torch.Tensor, branch: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, 1 + h*w, D), or (B, 1 + k, D) with token dropping's kept positions
        `keep` (B, k); branch (B, C, s, s) -> tokens of the same shape."""
        B, _, D = tokens.shape
        cls, patches = tokens[:, :1], tokens[:, 1:]
        t2b = self.to_grid(branch)  # (B, D, h, w)
        h, w = t2b.shape[-2:]
        if keep is None:
            grid = patches.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
            fused = (self.token_dw(grid) + t2b).flatten(2).transpose(1, 2)  # (B, h*w, D)
        else:
            fused = self.fuse_kept(patches, t2b, keep)  # (B, k, D)
        return self.ln(torch.cat([cls + cls, fused], dim=1))

    def fuse_kept(self, patches: torch.Tensor, t2b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The adapter on the kept tokens only (token dropping, pipeline/model/token_drop.py).

        The reference (Hxyou/MSCLIP `Lateral_Adapter`) never drops tokens: it convolves the
        full h x w token map. Here the dropped tokens do not exist, so the depthwise 3x3 reads
        them as zeros, as it already reads the zero padding past the grid's edge; its
        BatchNorm takes its batch statistics over the tokens that exist, as it does over the
        whole grid when nothing is dropped; and the branch, a convnet on the raw pixels that
        has no tokens to drop, runs in full and is read at the kept positions. With every
        token kept this is the reference's arithmetic, bit for bit (tests/test_token_drop.py)."""
        B, D, h, w = t2b.shape
        conv, bn = self.token_dw
        depthwise = conv(scatter_grid(patches, keep, h * w).reshape(B, D, h, w))  # (B, D, h, w)
        kept = gather_tokens(depthwise.flatten(2).transpose(1, 2), keep)  # (B, k, D)
        kept = bn(kept.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # statistics of kept tokens
        return kept + gather_tokens(t2b.flatten(2).transpose(1, 2), keep)


class VisionTower(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        width = arch.vision_width
        self.grad_checkpointing = False
        # With the conv stem, MS-CLIP's layer 0 *is* the stem: blocks[i] is layer i + first_layer.
        self.first_layer = 1 if arch.early_conv_stem else 0
        self.stem = EarlyConvStem(width, arch.stem_strides) if arch.early_conv_stem else PatchEmbed(width, arch.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(arch.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width, eps=arch.ln_eps)
        self.blocks = nn.ModuleList(
            Block(width, arch.vision_heads, arch.mlp_ratio, arch.ln_eps, arch.activation) for _ in range(self.first_layer, arch.vision_layers))
        self.ln_post = LayerNorm(width, eps=arch.ln_eps)
        self.proj = nn.Parameter(torch.zeros(width, arch.embed_dim))
        if arch.roi_dim:
            self.roi_proj = nn.Linear(arch.roi_dim, width, bias=False)  # PyramidCLIP's proj_pre
            self.roi_layers = arch.roi_layers

        # fusion layer -> branch stage index
        self.fusion_stage = {layer: j for j, layer in enumerate(arch.fusion_layers)} if arch.parallel_branch else {}
        if arch.parallel_branch:
            self.branch = ParallelBranch(width, arch.branch_strides)
            sizes, size = [], arch.image_size
            for stride in arch.branch_strides:
                size //= stride
                sizes.append(size)
            self.adapters = nn.ModuleList(
                LateralAdapter(c, width, s // arch.grid_size, arch.ln_eps) for c, s in zip(self.branch.channels, sizes))

    def block_at(self, layer: int) -> Block:
        """The transformer block of layer `layer` (MS-CLIP numbering, stem = layer 0)."""
        if layer < self.first_layer:
            raise IndexError(f"vision layer {layer} is the conv stem, not a transformer block")
        return self.blocks[layer - self.first_layer]

    def encode_rois(self, rois: torch.Tensor, roi_mask: torch.Tensor) -> torch.Tensor:
        """PyramidCLIP's ROI sequence (models.py): (B, R, roi_dim) -> proj_pre, the CLS token
        prepended, ln_pre (no positional embedding), the last roi_layers blocks attending
        only to CLS and the real ROIs (roi_mask (B, R)), then ln_post of CLS -> (B, D)."""
        x = self.roi_proj(rois.to(self.roi_proj.weight.dtype))  # (B, R, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1))  # (B, 1 + R, D)
        keys = torch.cat([torch.ones_like(roi_mask[:, :1]), roi_mask], dim=1).bool()  # CLS always
        for block in self.blocks[-self.roi_layers:]:
            x = block(x, False, keys)
        return self.ln_post(x[:, 0])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, D) tokens after ln_post; token 0 is CLS."""
        return self.ln_post(self.hidden_tokens(image))

    def hidden_tokens(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, D): the last block's output, before ln_post. With
        token dropping's kept patch positions `keep` (B, k): (B, 1 + k, D), the patch tokens
        dropped after the positional embedding, as FLIP and open_clip's patch_dropout do
        (for MS-CLIP-S after the conv stem, which replaces the patch embedding)."""
        x = self.stem(image)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, D)
        if keep is not None:
            x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], keep)], dim=1)  # (B, 1 + k, D)
        x = self.ln_pre(x)
        branch = image
        for i, block in enumerate(self.blocks):
            stage = self.fusion_stage.get(i + self.first_layer)
            if stage is not None:
                branch = self.branch.stages[stage](branch)  # (B, C_j, s_j, s_j)
                x = self.adapters[stage](x, branch, keep)
            x = checkpointed(block, x, False, enabled=self.grad_checkpointing)
        return x
