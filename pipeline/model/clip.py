"""The modality-shared CLIP model: CLIP's dual encoder, with any part of the
transformer blocks shared between the two towers (MS-CLIP, You et al., ECCV 2022,
arXiv 2207.12661; reference Hxyou/MSCLIP at e25daf3, `CLIP.__init__`).

Sharing is by object identity, as in the reference (`setattr` of the vision
block's module onto the text block): the parameter count is honest and
`model.visual.block_at(i).attn is model.text.blocks[i].attn` holds for every
shared layer i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import SHARED_BLOCK_MODULES, ModelArch, resolve_arch
from .text import TextTower
from .vision import VisionTower

MAX_LOGIT_SCALE = math.log(100)


class SharedCLIP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.arch = arch
        self.visual = VisionTower(arch)
        self.text = TextTower(arch)
        # Shape (1,) rather than CLIP's 0-dim: DeepSpeed 0.19.8's initialize broadcasts
        # parameters through a uint8 view, which fails on 0-dim tensors
        # (tests/test_model.py::test_deepspeed_initialize_accepts_model catches a regression).
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.shared_layers = list(range(arch.unshared_layers, arch.text_layers)) if arch.share != "none" else []
        for layer in self.shared_layers:
            vision_block, text_block = self.visual.block_at(layer), self.text.blocks[layer]
            for name in SHARED_BLOCK_MODULES[arch.share]:
                setattr(text_block, name, getattr(vision_block, name))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every parameter, as open_clip initializes CLIP: the text blocks with OpenAI CLIP's
        width-scaled scheme (openai/CLIP:clip/model.py `initialize_parameters`), the vision
        blocks at PyTorch's default Linear scale (OpenAI's and open_clip's ViT keep the
        defaults), embeddings and projections as CLIP, convolutions and adapters
        trunc-normal(0.02) (MS-CLIP's), norms at 1/0, the logit scale at arch.logit_scale_init.

        MS-CLIP uses trunc-normal(0.02) for every transformer linear. At width 768 that is
        close to these scales, but at the tiny widths it starts the image features nearly
        collapsed (pairwise cosine 0.99), so we follow open_clip at every width."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Vision blocks first, text blocks second: a block module shared by both towers ends
        # up with the text tower's init, as in MS-CLIP where the text blocks hold the
        # shared weights after setattr.
        for block in self.visual.blocks:
            for linear in (block.attn.qkv, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                # PyTorch's default Linear scale (open_clip's ViT keeps the defaults)
                nn.init.normal_(linear.weight, std=(3 * linear.weight.shape[1]) ** -0.5)
        width, layers = self.text.blocks[0].attn.out_proj.weight.shape[0], len(self.text.blocks)
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.text.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        v, t = self.visual, self.text
        v_scale = v.class_embedding.shape[0] ** -0.5
        v.class_embedding.copy_(v_scale * torch.randn_like(v.class_embedding))
        v.positional_embedding.copy_(v_scale * torch.randn_like(v.positional_embedding))
        v.proj.copy_(v_scale * torch.randn_like(v.proj))
        nn.init.normal_(t.token_embedding.weight, std=0.02)
        nn.init.normal_(t.positional_embedding, std=0.01)
        nn.init.normal_(t.text_projection, std=t.text_projection.shape[0] ** -0.5)
        self.logit_scale.fill_(self.arch.logit_scale_init)

    # ---- the interface the trainer and the evaluators use -------------------------
    def image_trunk(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled image features before the joint projection (B, D): the CLS token after
        ln_post, which CLIP's linear-probe protocol uses."""
        return self.visual(image)[:, 0]

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._pool_image(self.visual(image))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._pool_text(self.text(text), text)  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_rois(self, rois: torch.Tensor, roi_mask: torch.Tensor) -> torch.Tensor:
        """PyramidCLIP's region level in the joint space (B, E), before normalization."""
        return self.visual.encode_rois(rois, roi_mask) @ self.visual.proj

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_tokens: bool = False,
                keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalized joint-space features, the (clamped) logit scale, the joint-space
        embeddings before normalization (SimSiam's and mixup's input), and on request the
        per-token features of both towers (before projection) for token-level objectives:
        image tokens before ln_post, as FILIP takes them (DeCLIP's visual_transformer
        `return_dense`), text tokens after ln_final, which MLM's head reads. What else an
        objective needs (more views, SLIP's trunk features, regions) it asks of
        `encode_image`, `encode_text`, `image_trunk` and `encode_rois` (pipeline/objectives.py).

        `keep` (B, k): token dropping's kept patch positions (model.token_drop; drawn by the
        loader, pipeline/model/token_drop.py), used in training mode only: evaluation always
        sees every token."""
        image_hidden = self.visual.hidden_tokens(image, keep if self.training else None)  # (B, N, Dv)
        text_tokens = self.text(text)  # (B, L, Dt)
        image_embedding = self._pool_image(self.visual.ln_post(image_hidden))  # (B, E)
        text_embedding = self._pool_text(text_tokens, text)  # (B, E)
        out = {
            "image_features": F.normalize(image_embedding, dim=-1),  # (B, E)
            "text_features": F.normalize(text_embedding, dim=-1),  # (B, E)
            # Clamped in the forward too (DeCLIP does this), so a scale that drifted past
            # 100 between the trainer's post-step clamps cannot blow up the logits.
            "logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(),
            "image_embedding": image_embedding,
            "text_embedding": text_embedding,
        }
        if return_tokens:
            out["image_tokens"], out["text_tokens"] = image_hidden, text_tokens
        return out

    def _pool_image(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] @ self.visual.proj  # CLS token -> (B, E)

    def _pool_text(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        eot = tokens[torch.arange(text.shape[0], device=text.device), TextTower.eot_positions(text)]  # (B, Dt)
        return eot @ self.text.text_projection  # (B, E)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay besides norms and biases
        (MS-CLIP: positional/token embeddings and logit_scale; plus the CLS embedding)."""
        return {"logit_scale", "visual.class_embedding", "visual.positional_embedding",
                "text.positional_embedding", "text.token_embedding.weight"}

    def use_channels_last(self):
        """The trainer feeds the images channels-last (pipeline.train.engine.model_batch), and
        PyTorch then runs every convolution of the stem, branch and adapters in NHWC.
        The weights keep their layout: DeepSpeed's ZeRO re-points parameters into its flat
        (contiguous) buffers, which would silently undo a weight conversion."""
        self.channels_last = True
        return self

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that both towers use (the same objects)."""
        text_ids = {id(p) for p in self.text.parameters()}
        return [p for p in self.visual.parameters() if id(p) in text_ids]

    def parameter_counts(self) -> dict[str, int]:
        """Total, shared, vision-only, text-only and other (logit scale) parameters."""
        shared = {id(p) for p in self.shared_parameters()}
        vision = {id(p): p.numel() for p in self.visual.parameters()}
        text = {id(p): p.numel() for p in self.text.parameters()}
        total = sum(p.numel() for p in self.parameters())
        counts = {
            "total": total,
            "shared": sum(n for i, n in vision.items() if i in shared),
            "vision_only": sum(n for i, n in vision.items() if i not in shared),
            "text_only": sum(n for i, n in text.items() if i not in shared),
            "vision_tower": sum(vision.values()),
            "text_tower": sum(text.values()),
        }
        counts["other"] = total - counts["shared"] - counts["vision_only"] - counts["text_only"]
        return counts


def build_model(name_or_arch: str | ModelArch | dict, overrides: dict | None = None) -> SharedCLIP:
    """Build any named size (`MODEL_CONFIGS`), with optional architecture overrides."""
    return SharedCLIP(resolve_arch(name_or_arch, overrides))
