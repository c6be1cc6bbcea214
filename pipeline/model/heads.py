"""FILIP's token heads (Yao et al., ICLR 2022, sec. 3.1): each tower's tokens -> Linear
to a small space -> L2 norm, and FILIP's own logit scale. The FILIP objective trains
them (pipeline/objectives.py FilipTerm); token-wise evaluation (eval/features.py) uses
them as an export carries them (`heads`: `filip.<name>`). They live with the model so
that evaluation and export never import the objectives."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelArch
from .text import TextTower

EXPORT_PREFIX = "filip."


class TokenHeads(nn.Module):
    def __init__(self, arch: ModelArch, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(arch.vision_width, dim)
        self.text_proj = nn.Linear(arch.text_width, dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # FILIP's init, unclamped

    def image_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, Dv) image tokens before ln_post -> (B, N, dim) normalized fp32 patch tokens."""
        return F.normalize(self.image_proj(hidden[:, 1:]).float(), dim=-1)

    def text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, Dt) text tokens after ln_final -> (B, L, dim) normalized fp32."""
        return F.normalize(self.text_proj(tokens).float(), dim=-1)

    @staticmethod
    def text_mask(text: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L) True on SOT..EOT (no padding), on the ids' device."""
        positions = torch.arange(text.shape[1], device=text.device)
        return positions[None] <= TextTower.eot_positions(text)[:, None]


def heads_for_export(state_dict: dict, prefixes: dict[str, str]) -> dict:
    """The heads an export carries, from the trainer's state dict: each state-dict prefix
    renamed to its export prefix (TrainModule.export_heads says which)."""
    return {name + k[len(prefix):]: v for name, prefix in prefixes.items()
            for k, v in state_dict.items() if k.startswith(prefix)}


def token_heads(arch: ModelArch, heads: dict) -> TokenHeads | None:
    """FILIP's heads rebuilt from an export's `filip.` weights (None when it has none)."""
    own = {k[len(EXPORT_PREFIX):]: v for k, v in heads.items() if k.startswith(EXPORT_PREFIX)}
    if not own:
        return None
    with torch.device("meta"):  # the weights are assigned: the heads live where they do
        module = TokenHeads(arch, own["image_proj.weight"].shape[0])
    module.load_state_dict(own, assign=True)
    return module.eval()
