"""Architecture description and the named model sizes.

Reference numbers come from OpenAI CLIP (Radford et al. 2021, arXiv 2103.00020, sec. 2.4
and Table 19-20; openai/CLIP clip/model.py) and MS-CLIP (You et al., ECCV 2022, arXiv
2207.12661, sec. 3; Hxyou/MSCLIP at e25daf3: experiments/model/b32.yaml and the
*-msclips.yaml configs, parameter counts from instantiating its `CLIP`). Decisions where the reference is silent are written
next to the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

# Which block modules are the same object in both towers, per sharing mode.
# MS-CLIP ("attn_mlp") shares the fused QKV, the out-projection and the MLP and keeps
# ln_1/ln_2 per modality; "all" also shares the block LayerNorms. Tower-level
# modules (embeddings, ln_pre/ln_post/ln_final, projections) are never shared.
SHARED_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "none": (),
    "attn": ("attn",),
    "mlp": ("mlp",),
    "attn_mlp": ("attn", "mlp"),
    "all": ("attn", "mlp", "ln_1", "ln_2"),
}

ACTIVATIONS = ("quick_gelu", "gelu")

NORMALIZATION = {
    # OpenAI CLIP's eval/training normalization.
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # MS-CLIP's config default (the released yaml does not override it).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class ModelArch:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    # Transformer layers of the vision tower, counting the conv stem as layer 0 when
    # early_conv_stem is on (as MS-CLIP's resblocks[0] is the stem).
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    # The MLP's activation: OpenAI CLIP and MS-CLIP use QuickGELU; open_clip's LAION models
    # (names without "-quickgelu") nn.GELU (exact erf), which imported weights need.
    activation: str = "quick_gelu"
    ln_eps: float = 1e-5
    share: str = "none"
    # The first k layers stay modality-specific (MS-CLIP-S: k=1, its N_LAYERS: 1).
    unshared_layers: int = 0
    # Early Specialization: a residual conv stem replaces the patch embedding and layer 0.
    early_conv_stem: bool = False
    stem_strides: tuple[int, ...] = (2, 2, 2, 2)
    # Efficient Parallel Branch: a conv branch on the raw image, fused by one lateral
    # adapter before each layer in fusion_layers (one branch stage per fusion point).
    parallel_branch: bool = False
    branch_strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    fusion_layers: tuple[int, ...] = (2, 4, 6, 8, 10)
    normalization: str = "clip"
    # PyramidCLIP's region (ROI) path: 0 = none; else each ROI is a roi_dim vector (2052 in
    # PyramidCLIP: presumably 2048 detector features + 4 box coordinates), projected to the
    # vision width and run through the last roi_layers vision blocks with a CLS token.
    roi_dim: int = 0
    roi_layers: int = 3
    # MS-CLIP's released code starts logit_scale at 1.0 but its pre-training value is
    # UNCONFIRMED (the checkpoint overwrites it); we use CLIP's ln(1/0.07) for every model.
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        def bad(key: str, why: str):
            raise ValueError(f"model.overrides.{key}: {why}")

        if self.share not in SHARED_BLOCK_MODULES:
            bad("share", f"{self.share!r} is not one of {sorted(SHARED_BLOCK_MODULES)}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"{self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.normalization not in NORMALIZATION:
            bad("normalization", f"{self.normalization!r} is not one of {sorted(NORMALIZATION)}")
        if self.image_size % self.patch_size:
            bad("patch_size", f"{self.patch_size} does not divide image_size {self.image_size}")
        for key in ("vision_width", "text_width"):
            width, heads = getattr(self, key), getattr(self, key.replace("width", "heads"))
            if width % heads:
                bad(key, f"{width} is not divisible by {key.replace('width', 'heads')} {heads}")
        if self.share != "none":
            for a, b in (("vision_width", "text_width"), ("vision_heads", "text_heads"), ("vision_layers", "text_layers")):
                if getattr(self, a) != getattr(self, b):
                    bad(b, f"sharing '{self.share}' needs {a} == {b}, got {getattr(self, a)} and {getattr(self, b)}")
            if self.early_conv_stem and self.unshared_layers < 1:
                bad("unshared_layers", "with early_conv_stem vision layer 0 is the conv stem, so at least 1 layer is unshared")
        if not 0 <= self.unshared_layers <= self.text_layers:
            bad("unshared_layers", f"{self.unshared_layers} is outside [0, {self.text_layers}]")
        if self.early_conv_stem:
            if self.vision_width % 16:
                bad("vision_width", "the conv stem uses width/16 channels, so vision_width must be a multiple of 16")
            if 2 * math.prod(self.stem_strides) != self.patch_size:
                bad("stem_strides", f"2 x prod{self.stem_strides} must equal patch_size {self.patch_size} (same token grid)")
        if self.parallel_branch:
            if not self.early_conv_stem:
                bad("parallel_branch", "the parallel branch is part of MS-CLIP-S and needs early_conv_stem")
            if len(self.branch_strides) != len(self.fusion_layers):
                bad("branch_strides", f"one stride per fusion layer: {len(self.branch_strides)} strides, {len(self.fusion_layers)} layers")
            first = 1 if self.early_conv_stem else 0
            if list(self.fusion_layers) != sorted(set(self.fusion_layers)) or not all(first <= k < self.vision_layers for k in self.fusion_layers):
                bad("fusion_layers", f"{self.fusion_layers} must be increasing transformer layers in [{first}, {self.vision_layers})")
            size = self.image_size
            for stride in self.branch_strides:
                size //= stride
                if size % self.grid_size:
                    bad("branch_strides", f"a branch stage of {size}px does not tile the {self.grid_size}x{self.grid_size} token grid")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


_B32 = dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
            text_width=512, text_layers=12, text_heads=8, context_length=77)
# MS-CLIP overrides the text tower to 768 wide / 12 heads so the shared weights fit both towers.
_MSCLIP = dict(_B32, text_width=768, text_heads=12, share="attn_mlp", ln_eps=1e-12, normalization="imagenet")
_MSCLIP_ES = dict(_MSCLIP, early_conv_stem=True, unshared_layers=1)
# A CPU-sized family with the same structure: 64px images, 4x4 token grid, 6 layers of width 128.
_TINY = dict(embed_dim=64, image_size=64, patch_size=16, vision_width=128, vision_layers=6, vision_heads=2,
             text_width=128, text_layers=6, text_heads=2, context_length=32)

MODEL_CONFIGS: dict[str, dict] = {
    "clip-b32": _B32,
    "clip-b16": dict(_B32, patch_size=16),
    "msclip-b32": _MSCLIP,
    "msclip-es-b32": _MSCLIP_ES,
    "msclip-s-b32": dict(_MSCLIP_ES, parallel_branch=True),
    "msclip-s-b16": dict(_MSCLIP_ES, patch_size=16, stem_strides=(2, 2, 2, 1), parallel_branch=True,
                         branch_strides=(2, 2, 2, 2, 1)),
    "clip-tiny": _TINY,
    "msclip-tiny": dict(_TINY, share="attn_mlp", ln_eps=1e-12, normalization="imagenet"),
    "msclip-s-tiny": dict(_TINY, share="attn_mlp", ln_eps=1e-12, normalization="imagenet",
                          early_conv_stem=True, unshared_layers=1, stem_strides=(2, 2, 2, 1),
                          parallel_branch=True, branch_strides=(2, 2, 2, 2, 1), fusion_layers=(1, 2, 3, 4, 5)),
}

ARCH_FIELDS = {f.name for f in fields(ModelArch)}


def resolve_arch(name_or_arch: str | ModelArch | dict, overrides: dict | None = None) -> ModelArch:
    """A named size (plus overrides), an arch dict, or an arch itself -> ModelArch."""
    if isinstance(name_or_arch, ModelArch):
        base = {f.name: getattr(name_or_arch, f.name) for f in fields(ModelArch)}
    elif isinstance(name_or_arch, dict):
        base = dict(name_or_arch)
    elif name_or_arch in MODEL_CONFIGS:
        base = dict(MODEL_CONFIGS[name_or_arch])
    else:
        raise ValueError(f"model.name: unknown model {name_or_arch!r}; known: {', '.join(MODEL_CONFIGS)}")
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in {**base, **(overrides or {})}.items()}
    unknown = sorted(set(merged) - ARCH_FIELDS)
    if unknown:
        raise ValueError(f"model.overrides.{unknown[0]}: unknown architecture field; known: {', '.join(sorted(ARCH_FIELDS))}")
    return ModelArch(**merged)
