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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ObjectiveConfig, active_weights, features_only  # noqa: F401
from pipeline.losses import contrastive_loss
from pipeline.losses.declip import IGNORE_INDEX, MASK_ID, FeatureQueue, SimSiamHead, mlm_loss, nn_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.losses.soft import mixup_contrastive_loss, softened_contrastive_loss
from pipeline.model import MAX_LOGIT_SCALE
from pipeline.model.text import TextTower

HEADS_PREFIX = "objective_heads."


def view_features(out: dict, modality: str, keys: list[str]) -> list[torch.Tensor]:
    """Normalized fp32 joint-space features of the named views of one modality (the batch
    keys they came from: images, images_1; text, text_eda, ...). Without extra views the
    forward's own features."""
    if f"{modality}_views" in out:
        return [F.normalize(out[f"{modality}_views"][key].float(), dim=-1) for key in keys]
    return [out[f"{modality}_features"].float()]


def contrastive_views(cfg: ObjectiveConfig) -> tuple[list[str], list[str]]:
    """The image and text views the CLIP-style terms pair (DeCLIP: 2 x 2)."""
    return ["images", "images_1"][:cfg.image_views], ["text", "text_eda"][:1 + cfg.text_eda]


class ClipTerm(nn.Module):
    """CLIP's symmetric InfoNCE on the pooled, projected features (METHODS.md 0.2); with
    several image and/or text views, DeCLIP's multi-view loss: the mean over every
    (image view, text view) pair (METHODS.md 3.1, L_MV)."""
    needs_tokens, ssl_views = False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.features_only = cfg.image_views == 1 and not cfg.text_eda
        self.image_keys, self.text_keys = contrastive_views(cfg)

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        scale = out["logit_scale"].float()
        pairs = [contrastive_loss(i, t, scale) for i in view_features(out, "image", self.image_keys)
                 for t in view_features(out, "text", self.text_keys)]
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
        labels = batch["mlm_labels"]
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
        return self.head(out["image_views"]["images"], out["image_views"]["images_1"])


class NearestNeighbourTerm(nn.Module):
    """DeCLIP's nearest-neighbour supervision: each text view's nearest neighbour in a
    per-rank FIFO of past text features (looked up before this batch is enqueued) is an
    extra positive for every image view; image -> neighbour only, neighbours gathered
    across ranks, averaged over the (image view, text view) pairs."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.queue = FeatureQueue(cfg.nn_queue_size, arch.embed_dim)
        self.image_keys, self.text_keys = contrastive_views(cfg)

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        texts = view_features(out, "text", self.text_keys)
        neighbours = [self.queue.nearest(t) for t in texts]
        for t in texts:
            self.queue.push(t)
        scale = out["logit_scale"].float()
        pairs = [nn_loss(image, nb.float(), scale) for image in view_features(out, "image", self.image_keys)
                 for nb in neighbours]
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
    """FILIP (METHODS.md 3.3): tower tokens (the image's patch tokens before ln_post, as
    DeCLIP's `return_dense`) -> Linear to a small space -> L2 norm; token-wise
    max-then-mean similarity both ways, padding excluded, top-k tokens kept before the
    all-gather, its own logit scale: init ln(1/0.07), no clamp in the forward; the
    trainer clamps it to [filip_logit_scale_min, filip_logit_scale_max] before the first
    step and after every step, as DeCLIP's FILIP runs clamp `logit_scale_dense` to [3, 6]
    (objectives.logit_scale_bounds)."""
    features_only, needs_tokens, ssl_views = False, True, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.image_proj = nn.Linear(arch.vision_width, cfg.filip_dim)
        self.text_proj = nn.Linear(arch.text_width, cfg.filip_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.top_k = cfg.filip_top_k or None

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        text = batch["text"]  # on the model's device (engine.batch_on_device): the mask is built there
        image_tokens = F.normalize(self.image_proj(out["image_tokens"][:, 1:]).float(), dim=-1)  # patches
        text_tokens = F.normalize(self.text_proj(out["text_tokens"]).float(), dim=-1)
        positions = torch.arange(text.shape[1], device=text.device)
        text_mask = positions[None] <= TextTower.eot_positions(text)[:, None]  # SOT..EOT, no padding
        scale = self.logit_scale.float().exp()
        return filip_loss(image_tokens, text_tokens, text_mask, scale, top_k=self.top_k)


class PyramidTerm(nn.Module):
    """PyramidCLIP (METHODS.md 4). Image levels: a global crop (90-100%), a local crop
    (50-100%) and, when the shards carry region features, the ROI sequence through the last
    3 vision blocks; text levels: a summary, the caption, and tags (pipeline/data/pyramid.py
    says where each comes from and the fallbacks).

    Decisions (the released code has no loss; METHODS.md marks the terms, epsilon and the
    weights UNCONFIRMED):
    * peer level: (global, summary), (local, caption), and (ROI, tags) when ROIs exist;
    * cross level: every other (image level, text level) pair;
    * every pair is a symmetric InfoNCE over the gathered batch with softened negatives
      (target 1 - eps on the pair, eps / (N - 1) on each negative; pyramid_epsilon, 0.2);
    * loss = mean(peer) + pyramid_cross_weight (1.0) x mean(cross).
    PyramidCLIP's architecture changes (LeFF blocks, frozen patch embedding, max-pooled
    text) belong to its model, not its objective, and are not part of this term."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.epsilon, self.cross_weight, self.rois = cfg.pyramid_epsilon, cfg.pyramid_cross_weight, cfg.pyramid_rois > 0

    def forward(self, out: dict, batch: dict):
        images = {"global": out["image_views"]["images"], "local": out["image_views"]["images_1"]}
        texts = {"summary": out["text_views"]["text_summary"], "caption": out["text_views"]["text"],
                 "tags": out["text_views"]["text_tags"]}
        if self.rois:
            images["roi"] = out["roi_embedding"]
        peers = {("global", "summary"), ("local", "caption"), ("roi", "tags")}
        scale = out["logit_scale"].float()
        peer, cross = [], []
        for i_name, image in images.items():
            for t_name, text in texts.items():
                loss = softened_contrastive_loss(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1),
                                                 scale, self.epsilon)
                (peer if (i_name, t_name) in peers else cross).append(loss)
        peer_loss, cross_loss = sum(peer) / len(peer), sum(cross) / len(cross)
        return peer_loss + self.cross_weight * cross_loss, {"peer": peer_loss, "cross": cross_loss}


class MixupTerm(nn.Module):
    """ZeroVL's coin-flipping mixup (METHODS.md 2.3): per step alpha ~ Beta(0.1, 0.1) and a
    coin; heads: the images are mixed on pixels with the reversed local batch (before the
    forward, `prepare`), tails: the projected text embeddings before normalization; the
    loss is alpha x CE(y) + (1 - alpha) x CE(flip(y)) both ways. The draws come from a
    generator seeded by (mixup_seed, draw number): the same on every rank, and the draw
    number is a buffer, so a resumed run continues the sequence."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.beta, self.seed = cfg.mixup_beta, cfg.mixup_seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._draws: int | None = None  # host copy: no device sync per step

    def draw(self) -> tuple[float, str]:
        if self._draws is None:
            self._draws = int(self.draws)
        rng = np.random.default_rng([self.seed, self._draws])
        alpha, coin = float(rng.beta(self.beta, self.beta)), float(rng.uniform())
        self._draws += 1
        self.draws.add_(1)
        return alpha, ("image" if coin > 0.5 else "text")

    def prepare(self, batch: dict) -> dict:
        alpha, side = self.draw()
        if side == "image":
            images = batch["images"]
            batch = {**batch, "images": alpha * images + (1 - alpha) * images.flip(0)}
        return {**batch, "mixup": (alpha, side)}

    def forward(self, out: dict, batch: dict) -> torch.Tensor:
        alpha, side = batch["mixup"]
        text = out["text_features"].float()
        if side == "text":
            embedding = out["text_views"]["text"].float()
            text = F.normalize(alpha * embedding + (1 - alpha) * embedding.flip(0), dim=-1)
        return mixup_contrastive_loss(out["image_features"].float(), text, out["logit_scale"].float(), alpha)


TERMS = {"clip": ClipTerm, "slip": SlipTerm, "filip": FilipTerm, "mlm": MlmTerm, "simsiam": SimSiamTerm,
         "nn": NearestNeighbourTerm, "pyramid": PyramidTerm, "mixup": MixupTerm}


def logit_scale_bounds(model: nn.Module, cfg: ObjectiveConfig) -> list[tuple[nn.Parameter, float, float]]:
    """Every learned log-temperature with the range the trainer clamps it to, before the
    first step and after each: the model's [logit_scale_min, ln 100] (CLIP, DeCLIP's floor
    3) and FILIP's own [filip_logit_scale_min, filip_logit_scale_max]."""
    bounds = [(model.logit_scale, cfg.logit_scale_min, MAX_LOGIT_SCALE)]
    if "filip" in active_weights(cfg):
        filip = model.objective_heads.terms["filip"]
        bounds.append((filip.logit_scale, cfg.filip_logit_scale_min, cfg.filip_logit_scale_max))
    return bounds


def masks_captions(cfg: ObjectiveConfig) -> bool:
    """The loader MLM-masks `text`: for the mlm term, or on request (objective.mask_captions)."""
    return "mlm" in active_weights(cfg) or cfg.mask_captions


def uses_mask_token(cfg: ObjectiveConfig) -> bool:
    return masks_captions(cfg) or cfg.caption_augment == "zerovl"


def caption_kwargs(cfg: ObjectiveConfig) -> dict:
    """The loader's caption and view options, for every objective (plain CLIP included)."""
    return {"view_augment": cfg.view_augment, "caption_augment": cfg.caption_augment,
            "mlm_probability": cfg.mlm_probability if masks_captions(cfg) else 0.0}


def objective_arch(arch, cfg: ObjectiveConfig):
    """The architecture the objective trains: masked captions (MLM, ZeroVL's caption
    augmentation) add DeCLIP's mask token to the vocabulary (id 49408 = CLIP's vocabulary
    size, so one more row); PyramidCLIP's ROI level adds the region projection."""
    weights = active_weights(cfg)
    if uses_mask_token(cfg) and arch.vocab_size <= MASK_ID:
        arch = dataclasses.replace(arch, vocab_size=MASK_ID + 1)
    if "pyramid" in weights and cfg.pyramid_rois:
        arch = dataclasses.replace(arch, roi_dim=cfg.roi_dim)
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
        pyramid = "pyramid" in self.terms
        self.image_views = 2 if pyramid else cfg.image_views
        # the views the forward embeds, by batch key (terms look them up by key)
        self.image_keys = ["images", "images_1"][:self.image_views]
        self.text_keys = ["text"] + ["text_eda"] * cfg.text_eda + ["text_summary", "text_tags"] * pyramid
        self.rois = pyramid and cfg.pyramid_rois > 0
        self.multi_view = len(self.image_keys) > 1 or len(self.text_keys) > 1 or "mixup" in self.terms

    def data_kwargs(self) -> dict:
        """What the loader must produce for these terms (pipeline.data.loader.DataStream)."""
        cfg, pyramid = self.cfg, "pyramid" in self.terms
        return {**caption_kwargs(cfg), "views": self.image_views,
                "view_augment": "pyramid" if pyramid else cfg.view_augment,
                "ssl_views": self.ssl_views, "text_eda": cfg.text_eda, "eda_synonyms": cfg.eda_synonyms,
                "text_levels": pyramid,
                "max_rois": cfg.pyramid_rois if self.rois else 0, "roi_dim": cfg.roi_dim if self.rois else 0}

    def prepare(self, batch: dict) -> dict:
        """Changes to the batch before the forward (ZeroVL's pixel mixup)."""
        for term in self.terms.values():
            if hasattr(term, "prepare"):
                batch = term.prepare(batch)
        return batch

    def model_kwargs(self, batch: dict, dtype: torch.dtype) -> dict:
        """What the model's forward must compute for these terms, beyond image and text
        (from a batch already on the model's device: engine.batch_on_device)."""
        def images(key):
            return batch[key].to(dtype=dtype)

        kwargs = {"return_tokens": self.needs_tokens}
        if self.ssl_views:
            kwargs["ssl_images"] = [images(f"ssl_{i}") for i in range(self.ssl_views)]
        if self.multi_view:
            kwargs["extra_images"] = [images(key) for key in self.image_keys[1:]]
            kwargs["extra_texts"] = [batch[key] for key in self.text_keys[1:]]
        if self.rois:
            kwargs["rois"] = images("rois")
            kwargs["roi_mask"] = batch["roi_mask"]
        return kwargs

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.multi_view:  # the views by batch key
            out = {**out, "image_views": dict(zip(self.image_keys, out["image_views"])),
                   "text_views": dict(zip(self.text_keys, out["text_views"]))}
        components = {}
        for name, term in self.terms.items():
            value = term(out, batch)
            if isinstance(value, tuple):  # a term with parts of its own logs them too
                value, parts = value
                components.update({f"loss_{name}_{part}": v for part, v in parts.items()})
            components[f"loss_{name}"] = value
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


# Terms that train the pooled projections and the CLIP logit scale, the path pooled
# evaluation measures.
POOLED_TERMS = frozenset({"clip", "nn", "pyramid", "mixup"})
FILIP_HEADS = HEADS_PREFIX + "terms.filip."


def trained_similarity(cfg: ObjectiveConfig) -> str:
    """Which similarity the objective trained, so evaluation measures that one: "token"
    (FILIP's token-wise late interaction) when FILIP is the only contrastive term and
    nothing trains the pooled path, else "pooled"."""
    weights = active_weights(cfg)
    return "token" if "filip" in weights and not POOLED_TERMS & weights.keys() else "pooled"


def exported_heads(state_dict: dict) -> dict:
    """The objective heads an export keeps: FILIP's token projections and scale (as
    `filip.<name>`), which token-wise evaluation needs; empty without FILIP."""
    return {"filip." + k[len(FILIP_HEADS):]: v for k, v in state_dict.items() if k.startswith(FILIP_HEADS)}


def token_heads(arch, heads: dict) -> "FilipTerm | None":
    """FILIP's heads rebuilt from an export's `filip.` weights (None when it has none)."""
    own = {k[len("filip."):]: v for k, v in heads.items() if k.startswith("filip.")}
    if not own:
        return None
    with torch.device("meta"):  # the weights are assigned: the heads live where they do
        term = FilipTerm(ObjectiveConfig(weights={"filip": 1.0}, filip_dim=own["image_proj.weight"].shape[0]), arch)
    term.load_state_dict(own, assign=True)
    return term.eval()


def without_objective_heads(state_dict: dict) -> dict:
    """The encoders' weights only (what exports and evaluation load)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(HEADS_PREFIX)}
