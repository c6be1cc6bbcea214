"""Training objectives: small pure functions over model outputs."""
from .contrastive import clip_objective, contrastive_loss
from .gather import all_gather_with_grad, world

__all__ = ["all_gather_with_grad", "clip_objective", "contrastive_loss", "world"]
