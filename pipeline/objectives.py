"""Composable training objectives (`objective.weights` in the run config).

Each term is a small nn.Module that declares what it needs from the data (extra image
views, EDA text, masked tokens) and from the model (token features, every view's
embeddings), and owns its heads and state (SLIP's MLP, FILIP's token projections and
logit scale, DeCLIP's vocabulary head, SimSiam head and text-feature queue).
DeCLIP = {clip: 0.4, nn: 0.2, simsiam: 0.2, mlm: 0.2} with 2 MoCo image views and an EDA
text view; DeFILIP adds filip: 0.2 (launch/recipes/demo-declip.yaml, demo-defilip.yaml). The composed objective is
attached to the model as `model.objective_heads`, so DeepSpeed trains and checkpoints the
heads with the model; exports drop them (evaluation needs the encoders only).

The plain CLIP objective needs nothing extra: the trainer runs it exactly as before,
including exact large-batch accumulation. Objectives that need more than the pooled
features (SLIP, FILIP, DeCLIP's terms, multi-view CLIP) run at accumulation 1 (global = micro x world).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.losses import contrastive_loss
from pipeline.losses.declip import IGNORE_INDEX, MASK_ID, FeatureQueue, SimSiamHead, mlm_loss, nn_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.model.text import TextTower

HEADS_PREFIX = "objective_heads."


def view_features(out: dict, modality: str) -> list[torch.Tensor]:
    """Normalized fp32 joint-space features of every view of one modality (one view when
    the forward computed no extra views)."""
    if f"{modality}_views" in out:
        return [F.normalize(v.float(), dim=-1) for v in out[f"{modality}_views"]]
    return [out[f"{modality}_features"].float()]


class ClipTerm(nn.Module):
    """CLIP's symmetric InfoNCE on the pooled, projected features (METHODS.md 0.2); with
    several image and/or text views, DeCLIP's multi-view loss: the mean over every
    (image view, text view) pair (METHODS.md 3.1, L_MV)."""
    needs_tokens, ssl_views = False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.features_only = cfg.image_views == 1 and not cfg.text_eda

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        scale = out["logit_scale"].float()
        pairs = [contrastive_loss(i, t, scale) for i in view_features(out, "image") for t in view_features(out, "text")]
        return sum(pairs) / len(pairs)


class MlmTerm(nn.Module):
    """DeCLIP's masked language modelling: a vocabulary head (Linear, with bias) on the
    text tower's ln_final token features, cross-entropy on the masked positions. The
    tower stays causal, as in DeCLIP; the loader masks `text` and sends `mlm_labels`."""
    features_only, needs_tokens, ssl_views = False, True, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        if arch.vocab_size <= MASK_ID:
            raise ValueError(f"objective.weights.mlm: the model's vocabulary ({arch.vocab_size}) has no mask "
                             f"token {MASK_ID}; build it with objective_arch()")
        self.head = nn.Linear(arch.text_width, arch.vocab_size)

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        labels = batch["mlm_labels"].to(out["text_tokens"].device, non_blocking=True)
        # The head only where a label is: the same loss as DeCLIP's head over every
        # position, without a (B, L, vocab) logit tensor (~15% of real tokens are selected).
        selected = labels != IGNORE_INDEX
        return mlm_loss(self.head(out["text_tokens"][selected]), labels[selected])


class SimSiamTerm(nn.Module):
    """DeCLIP's SimSiam on the two image views' joint-space embeddings (before
    normalization): projector 2E-wide, predictor E-wide (DeCLIP's 1024/512 at E=512)."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.head = SimSiamHead(arch.embed_dim, proj_dim=2 * arch.embed_dim, pred_dim=arch.embed_dim)

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        view_1, view_2 = out["image_views"][:2]
        return self.head(view_1, view_2)


class NearestNeighbourTerm(nn.Module):
    """DeCLIP's nearest-neighbour supervision: each text view's nearest neighbour in a
    per-rank FIFO of past text features (looked up before this batch is enqueued) is an
    extra positive for every image view; image -> neighbour only, neighbours gathered
    across ranks, averaged over the (image view, text view) pairs."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.queue = FeatureQueue(cfg.nn_queue_size, arch.embed_dim)

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        texts = view_features(out, "text")
        neighbours = [self.queue.nearest(t) for t in texts]
        for t in texts:
            self.queue.push(t)
        scale = out["logit_scale"].float()
        pairs = [nn_loss(image, nb.float(), scale) for image in view_features(out, "image") for nb in neighbours]
        return sum(pairs) / len(pairs)


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
        image_tokens = F.normalize(self.image_proj(out["image_tokens"][:, 1:]).float(), dim=-1)  # patches
        text_tokens = F.normalize(self.text_proj(out["text_tokens"]).float(), dim=-1)
        positions = torch.arange(text.shape[1], device=text.device)
        text_mask = positions[None] <= TextTower.eot_positions(text)[:, None]  # SOT..EOT, no padding
        scale = self.logit_scale.float().clamp(max=math.log(100)).exp()
        return filip_loss(image_tokens, text_tokens, text_mask, scale, top_k=self.top_k)


TERMS = {"clip": ClipTerm, "slip": SlipTerm, "filip": FilipTerm, "mlm": MlmTerm, "simsiam": SimSiamTerm,
         "nn": NearestNeighbourTerm}


def active_weights(cfg: ObjectiveConfig) -> dict[str, float]:
    return {name: float(w) for name, w in cfg.weights.items() if w > 0}


def features_only(cfg: ObjectiveConfig) -> bool:
    """True when the loss is a function of one view's pooled features (exact
    accumulation can run it)."""
    return set(active_weights(cfg)) <= {"clip"} and cfg.image_views == 1 and not cfg.text_eda


def objective_arch(arch, cfg: ObjectiveConfig):
    """The architecture the objective trains: MLM adds DeCLIP's mask token to the
    vocabulary (id 49408 = CLIP's vocabulary size, so one more row)."""
    if "mlm" in active_weights(cfg) and arch.vocab_size <= MASK_ID:
        return dataclasses.replace(arch, vocab_size=MASK_ID + 1)
    return arch


class ComposedObjective(nn.Module):
    """sum_k weight_k x term_k; returns the total and every term (`loss_<name>`)."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.cfg = cfg
        self.weights = active_weights(cfg)
        self.terms = nn.ModuleDict({name: TERMS[name](cfg, arch) for name in self.weights})
        self.features_only = all(t.features_only for t in self.terms.values())
        self.needs_tokens = any(t.needs_tokens for t in self.terms.values())
        self.ssl_views = max(t.ssl_views for t in self.terms.values())
        self.multi_view = cfg.image_views > 1 or cfg.text_eda

    def data_kwargs(self) -> dict:
        """What the loader must produce for these terms (pipeline.data.loader.DataStream)."""
        cfg = self.cfg
        return {"views": cfg.image_views, "view_augment": cfg.view_augment, "ssl_views": self.ssl_views,
                "text_eda": cfg.text_eda, "eda_synonyms": cfg.eda_synonyms,
                "mlm_probability": cfg.mlm_probability if "mlm" in self.terms else 0.0}

    def model_kwargs(self, batch: dict, dtype: torch.dtype, device) -> dict:
        """What the model's forward must compute for these terms, beyond image and text."""
        def images(key):
            return batch[key].to(device=device, dtype=dtype, non_blocking=True)

        kwargs = {"return_tokens": self.needs_tokens}
        if self.ssl_views:
            kwargs["ssl_images"] = [images(f"ssl_{i}") for i in range(self.ssl_views)]
        if self.multi_view:
            kwargs["extra_images"] = [images(f"images_{v}") for v in range(1, self.cfg.image_views)]
            kwargs["extra_texts"] = [batch["text_eda"].to(device, non_blocking=True)] if self.cfg.text_eda else []
        return kwargs

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        components = {f"loss_{name}": term(out, batch) for name, term in self.terms.items()}
        total = sum(self.weights[name] * components[f"loss_{name}"] for name in self.terms)
        return total, components


def attach_objective(model: nn.Module, cfg: ObjectiveConfig) -> ComposedObjective | None:
    """The composed objective, registered on the model when it has parameters of its own
    (so the engine optimizes and checkpoints them); None for plain CLIP, which the
    trainer runs on its exact-accumulation path."""
    if active_weights(cfg) == {"clip": 1.0} and features_only(cfg):
        return None
    objective = ComposedObjective(cfg, model.arch)
    model.objective_heads = objective
    return objective


def without_objective_heads(state_dict: dict) -> dict:
    """The encoders' weights only (what exports and evaluation load)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(HEADS_PREFIX)}
