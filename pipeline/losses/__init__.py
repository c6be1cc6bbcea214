"""Training objectives: small pure functions over model outputs."""
from .contrastive import contrastive_loss
from .gather import all_gather_with_grad, local_labels

__all__ = ["all_gather_with_grad", "contrastive_loss", "local_labels"]
