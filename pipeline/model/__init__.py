"""The modality-shared CLIP model family (see clip.py)."""
from .clip import MAX_LOGIT_SCALE, SharedCLIP, build_model
from .configs import MODEL_CONFIGS, NORMALIZATION, SHARED_BLOCK_MODULES, ModelArch, resolve_arch

__all__ = ["MAX_LOGIT_SCALE", "MODEL_CONFIGS", "NORMALIZATION", "SHARED_BLOCK_MODULES", "ModelArch", "SharedCLIP",
           "build_model", "resolve_arch"]
