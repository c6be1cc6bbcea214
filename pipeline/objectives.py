"""Composable training objectives (`objective.weights` in the run config).

Each term is a small nn.Module that declares what it needs from the data (extra
self-supervised image views) and from the model (token features), and owns its heads
(SLIP's MLP, FILIP's token projections and logit scale). The composed objective is
attached to the model as `model.objective_heads`, so DeepSpeed trains and checkpoints the
heads with the model; exports drop them (evaluation needs the encoders only).

The plain CLIP objective needs nothing extra: the trainer runs it exactly as before,
including exact large-batch accumulation. Objectives that need more than the pooled
features (SLIP, FILIP) run at accumulation 1 (global = micro x world).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.losses import contrastive_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.model.text import TextTower

HEADS_PREFIX = "objective_heads."


class ClipTerm(nn.Module):
    """CLIP's symmetric InfoNCE on the pooled, projected features (METHODS.md 0.2)."""
    features_only, needs_tokens, ssl_views = True, False, 0

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        return contrastive_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())


class SlipTerm(nn.Module):
    """SLIP (METHODS.md 3.2): two SimCLR views through the same image trunk, an MLP head
    (Linear, BN, ReLU, Linear, BN, ReLU, Linear), NT-Xent gathered with gradient. BN is
    per rank here (SLIP uses SyncBN on GPUs)."""
    features_only, needs_tokens, ssl_views = False, False, 2

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        hidden = cfg.slip_mlp_dim
        self.temperature = cfg.simclr_temperature
        self.head = nn.Sequential(
            nn.Linear(arch.vision_width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, cfg.slip_out_dim))

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        view_a, view_b = out["ssl_trunk"]
        return simclr_loss(self.head(view_a).float(), self.head(view_b).float(), self.temperature)


class FilipTerm(nn.Module):
    """FILIP (METHODS.md 3.3): tower tokens -> Linear to a small space -> L2 norm;
    token-wise max-then-mean similarity both ways, padding excluded, top-k tokens kept
    before the all-gather, its own logit scale (init ln(1/0.07), clamped at ln 100)."""
    features_only, needs_tokens, ssl_views = False, True, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.image_proj = nn.Linear(arch.vision_width, cfg.filip_dim)
        self.text_proj = nn.Linear(arch.text_width, cfg.filip_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.top_k = cfg.filip_top_k or None

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        text = batch["text"]
        image_tokens = nn.functional.normalize(self.image_proj(out["image_tokens"][:, 1:]).float(), dim=-1)  # patches
        text_tokens = nn.functional.normalize(self.text_proj(out["text_tokens"]).float(), dim=-1)
        positions = torch.arange(text.shape[1], device=text.device)
        text_mask = positions[None] <= TextTower.eot_positions(text)[:, None]  # SOT..EOT, no padding
        scale = self.logit_scale.float().clamp(max=math.log(100)).exp()
        return filip_loss(image_tokens, text_tokens, text_mask, scale, top_k=self.top_k)


TERMS = {"clip": lambda cfg, arch: ClipTerm(), "slip": SlipTerm, "filip": FilipTerm}


class ComposedObjective(nn.Module):
    """sum_k weight_k x term_k; returns the total and every term (`loss_<name>`)."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.weights = {name: float(w) for name, w in cfg.weights.items() if w > 0}
        self.terms = nn.ModuleDict({name: TERMS[name](cfg, arch) for name in self.weights})
        self.features_only = all(t.features_only for t in self.terms.values())
        self.needs_tokens = any(t.needs_tokens for t in self.terms.values())
        self.ssl_views = max(t.ssl_views for t in self.terms.values())

    def model_kwargs(self, batch: dict, dtype: torch.dtype, device) -> dict:
        """What the model's forward must compute for these terms, beyond image and text."""
        kwargs = {"return_tokens": self.needs_tokens}
        if self.ssl_views:
            kwargs["ssl_images"] = [batch[f"ssl_{i}"].to(device=device, dtype=dtype, non_blocking=True)
                                    for i in range(self.ssl_views)]
        return kwargs

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        components = {f"loss_{name}": term(out, batch) for name, term in self.terms.items()}
        total = sum(self.weights[name] * components[f"loss_{name}"] for name in self.terms)
        return total, components


def attach_objective(model: nn.Module, cfg: ObjectiveConfig) -> ComposedObjective | None:
    """The composed objective, registered on the model when it has parameters of its own
    (so the engine optimizes and checkpoints them); None for plain CLIP, which the
    trainer runs on its exact-accumulation path."""
    if {name: float(w) for name, w in cfg.weights.items()} == {"clip": 1.0}:
        return None
    objective = ComposedObjective(cfg, model.arch)
    model.objective_heads = objective
    return objective


def without_objective_heads(state_dict: dict) -> dict:
    """The encoders' weights only (what exports and evaluation load)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(HEADS_PREFIX)}
