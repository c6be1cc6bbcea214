"""The modality-shared CLIP model family (see clip.py).

The architecture tables (configs.py) are plain Python; the modules (clip.py) need torch
and are imported on first use, so that the run config is checked without torch
(launch/train.py validates a config in a fraction of a second).
"""
from .configs import MODEL_CONFIGS, NORMALIZATION, SHARED_BLOCK_MODULES, ModelArch, resolve_arch

__all__ = ["MAX_LOGIT_SCALE", "MODEL_CONFIGS", "NORMALIZATION", "SHARED_BLOCK_MODULES", "ModelArch", "SharedCLIP",
           "build_model", "resolve_arch"]


def __getattr__(name: str):
    if name in ("MAX_LOGIT_SCALE", "SharedCLIP", "build_model"):
        from . import clip
        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
