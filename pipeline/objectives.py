"""Composable training objectives (`objective.weights` in the run config), and the module
DeepSpeed trains: `TrainModule`, the encoder and the objective together.

Every objective is a `ComposedObjective` of weighted terms: plain CLIP is {clip: 1.0}, a
term with no parameters, so it adds nothing to the state dict. Each term is a small
`Term` that says what it needs from the data (extra image views, EDA text, masked
tokens: `ComposedObjective.recipe`, a typed pipeline.data.recipe.BatchRecipe) and from the
encoder (token features, every view's embeddings: `ComposedObjective.encode`), owns its
heads and state (SLIP's MLP, FILIP's token heads, DeCLIP's vocabulary head, SimSiam head
and text-feature queue) and returns (loss, parts).
DeCLIP = {clip: 0.4, nn: 0.2, simsiam: 0.2, mlm: 0.2} with 2 MoCo image views and an EDA
text view; DeFILIP adds filip: 0.2 (launch/recipes/demo-declip.yaml, demo-defilip.yaml).

An objective of one view's pooled features (plain CLIP) runs with exact large-batch
accumulation (pipeline/train/engine.py); the others at accumulation 1 (global = micro x world).
The model (pipeline/model) never imports this module: export and evaluation need the
encoder only, plus FILIP's token heads (pipeline/model/heads.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ObjectiveConfig, active_weights
from pipeline.data.recipe import BatchRecipe
from pipeline.losses import contrastive_loss
from pipeline.losses.declip import FeatureQueue, SimSiamHead, mlm_loss, nn_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.losses.soft import mixup_contrastive_loss, softened_contrastive_loss
from pipeline.model import MAX_LOGIT_SCALE
from pipeline.model.heads import EXPORT_PREFIX, TokenHeads
from pipeline.tokenizer import IGNORE_INDEX, MASK_ID


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


class Term(nn.Module):
    """One weighted term of the objective. What it needs, beyond one view's pooled features:
    `needs_tokens` (both towers' token features), `ssl_views` (SLIP's extra views through
    the image trunk); `features_only`: it scores image_features, text_features and
    logit_scale alone (exact accumulation can run it). `prepare` may change the batch
    before the forward (ZeroVL's pixel mixup). `forward(out, batch)` -> (loss, parts)."""
    features_only, needs_tokens, ssl_views = False, False, 0

    def prepare(self, batch: dict) -> dict:
        return batch


class ClipTerm(Term):
    """CLIP's symmetric InfoNCE on the pooled, projected features (Radford et al. 2021,
    sec. 2.3); with several image and/or text views, DeCLIP's multi-view loss: the mean
    over every (image view, text view) pair (Li et al. 2022, sec. 3.2, L_MVS;
    Sense-GVT/DeCLIP prototype/model/declip.py)."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.features_only = cfg.image_views == 1 and not cfg.text_eda
        self.image_keys, self.text_keys = contrastive_views(cfg)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        scale = out["logit_scale"].float()
        pairs = [contrastive_loss(i, t, scale) for i in view_features(out, "image", self.image_keys)
                 for t in view_features(out, "text", self.text_keys)]
        return sum(pairs) / len(pairs), {}


class MlmTerm(Term):
    """DeCLIP's masked language modelling: a vocabulary head (Linear, with bias) on the
    text tower's ln_final token features, cross-entropy on the masked positions. The
    tower stays causal, as in DeCLIP; the loader masks `text` and sends `mlm_labels`."""
    needs_tokens = True

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        if arch.vocab_size <= MASK_ID:
            raise ValueError(f"objective.weights.mlm: the model's vocabulary ({arch.vocab_size}) has no mask "
                             f"token {MASK_ID}; build it with objective_arch()")
        self.head = nn.Linear(arch.text_width, arch.vocab_size)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        labels = batch["mlm_labels"]
        # The head only where a label is: the same loss as DeCLIP's head over every
        # position, without a (B, L, vocab) logit tensor (~15% of real tokens are selected).
        selected = labels != IGNORE_INDEX
        return mlm_loss(self.head(out["text_tokens"][selected]), labels[selected]), {}


class SimSiamTerm(Term):
    """DeCLIP's SimSiam on the two image views' joint-space embeddings (before
    normalization): projector 2E-wide, predictor E-wide (DeCLIP's 1024/512 at E=512)."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.head = SimSiamHead(arch.embed_dim, proj_dim=2 * arch.embed_dim, pred_dim=arch.embed_dim)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.head(out["image_views"]["images"], out["image_views"]["images_1"]), {}


class NearestNeighbourTerm(Term):
    """DeCLIP's nearest-neighbour supervision: each text view's nearest neighbour in a
    per-rank FIFO of past text features (looked up before this batch is enqueued) is an
    extra positive for every image view; image -> neighbour only, neighbours gathered
    across ranks, averaged over the (image view, text view) pairs."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.queue = FeatureQueue(cfg.nn.queue_size, arch.embed_dim)
        self.image_keys, self.text_keys = contrastive_views(cfg)

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        texts = view_features(out, "text", self.text_keys)
        neighbours = [self.queue.nearest(t) for t in texts]
        for t in texts:
            self.queue.push(t)
        scale = out["logit_scale"].float()
        pairs = [nn_loss(image, nb.float(), scale) for image in view_features(out, "image", self.image_keys)
                 for nb in neighbours]
        return sum(pairs) / len(pairs), {}


class SlipTerm(Term):
    """SLIP (Mu et al. 2022, sec. 3; facebookresearch/SLIP models.py): two SimCLR views through the same image trunk, an MLP head
    (Linear, BN, ReLU, Linear, BN, ReLU, Linear), NT-Xent gathered with gradient. BN is
    per rank here (SLIP uses SyncBN on GPUs)."""
    ssl_views = 2

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        hidden = cfg.slip.mlp_dim
        self.temperature = cfg.slip.temperature
        self.head = nn.Sequential(
            nn.Linear(arch.vision_width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, cfg.slip.out_dim))

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        view_a, view_b = out["ssl_trunk"]
        return simclr_loss(self.head(view_a).float(), self.head(view_b).float(), self.temperature), {}


class FilipTerm(Term):
    """FILIP (Yao et al. 2022, sec. 3.1): tower tokens (the image's patch tokens before
    ln_post, as DeCLIP's `return_dense`) through FILIP's token heads
    (pipeline/model/heads.py); token-wise max-then-mean similarity both ways, padding
    excluded, top-k tokens kept before the all-gather, its own logit scale: init
    ln(1/0.07), no clamp in the forward; the step clamps it to objective.filip's
    [logit_scale_min, logit_scale_max] after every update (and the trainer before the
    first), as DeCLIP's FILIP runs clamp `logit_scale_dense` to [3, 6] (logit_scale_bounds)."""
    needs_tokens = True

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.heads = TokenHeads(arch, cfg.filip.dim)
        self.top_k = cfg.filip.top_k or None

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        text = batch["text"]  # on the model's device (engine.batch_on_device): the mask is built there
        scale = self.heads.logit_scale.float().exp()
        return filip_loss(self.heads.image_tokens(out["image_tokens"]), self.heads.text_tokens(out["text_tokens"]),
                          self.heads.text_mask(text), scale, top_k=self.top_k), {}


class PyramidTerm(Term):
    """PyramidCLIP (Gao et al. 2022, sec. 3). Image levels: a global crop (90-100%), a local crop
    (50-100%) and, when the shards carry region features, the ROI sequence through the last
    3 vision blocks; text levels: a summary, the caption, and tags (pipeline/data/pyramid.py
    says where each comes from and the fallbacks).

    Decisions (the released code has no loss; the paper leaves the pairing, epsilon and the
    weights open):
    * peer level: (global, summary), (local, caption), and (ROI, tags) when ROIs exist;
    * cross level: every other (image level, text level) pair;
    * every pair is a symmetric InfoNCE over the gathered batch with softened negatives
      (target 1 - eps on the pair, eps / (N - 1) on each negative; objective.pyramid.epsilon, 0.2);
    * loss = mean(peer) + objective.pyramid.cross_weight (1.0) x mean(cross).
    PyramidCLIP's architecture changes (LeFF blocks, frozen patch embedding, max-pooled
    text) belong to its model, not its objective, and are not part of this term."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.epsilon, self.cross_weight, self.rois = cfg.pyramid.epsilon, cfg.pyramid.cross_weight, cfg.pyramid.rois > 0

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
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


class MixupTerm(Term):
    """ZeroVL's coin-flipping mixup (Cui et al. 2022, sec. 3.3; zerovl/ZeroVL): per step alpha ~ Beta(0.1, 0.1) and a
    coin; heads: the images are mixed on pixels with the reversed local batch (before the
    forward, `prepare`), tails: the projected text embeddings before normalization; the
    loss is alpha x CE(y) + (1 - alpha) x CE(flip(y)) both ways. The draws come from a
    generator seeded by (objective.mixup.seed, draw number): the same on every rank, and the draw
    number is a buffer, so a resumed run continues the sequence."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.beta, self.seed = cfg.mixup.beta, cfg.mixup.seed
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

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        alpha, side = batch["mixup"]
        text = out["text_features"].float()
        if side == "text":
            embedding = out["text_views"]["text"].float()
            text = F.normalize(alpha * embedding + (1 - alpha) * embedding.flip(0), dim=-1)
        return mixup_contrastive_loss(out["image_features"].float(), text, out["logit_scale"].float(), alpha), {}


TERMS = {"clip": ClipTerm, "slip": SlipTerm, "filip": FilipTerm, "mlm": MlmTerm, "simsiam": SimSiamTerm,
         "nn": NearestNeighbourTerm, "pyramid": PyramidTerm, "mixup": MixupTerm}


def masks_captions(cfg: ObjectiveConfig) -> bool:
    """The loader MLM-masks `text`: for the mlm term, or on request (objective.mask_captions)."""
    return "mlm" in active_weights(cfg) or cfg.mask_captions


def uses_mask_token(cfg: ObjectiveConfig) -> bool:
    return masks_captions(cfg) or cfg.caption_augment == "zerovl"


def objective_arch(arch, cfg: ObjectiveConfig):
    """The architecture the objective trains: masked captions (MLM, ZeroVL's caption
    augmentation) add DeCLIP's mask token to the vocabulary (id 49408 = CLIP's vocabulary
    size, so one more row); PyramidCLIP's ROI level adds the region projection."""
    weights = active_weights(cfg)
    if uses_mask_token(cfg) and arch.vocab_size <= MASK_ID:
        arch = dataclasses.replace(arch, vocab_size=MASK_ID + 1)
    if "pyramid" in weights and cfg.pyramid.rois:
        arch = dataclasses.replace(arch, roi_dim=cfg.pyramid.roi_dim)
    return arch


# Terms that train the pooled projections and the CLIP logit scale, the path pooled
# evaluation measures.
POOLED_TERMS = frozenset({"clip", "nn", "pyramid", "mixup"})


def trained_similarity(cfg: ObjectiveConfig) -> str:
    """Which similarity the objective trained, so evaluation measures that one: "token"
    (FILIP's token-wise late interaction) when FILIP is the only contrastive term and
    nothing trains the pooled path, else "pooled"."""
    weights = active_weights(cfg)
    return "token" if "filip" in weights and not POOLED_TERMS & weights.keys() else "pooled"


class ComposedObjective(nn.Module):
    """sum_k weight_k x term_k; returns the total and every term (`loss_<name>`, and a
    term's own parts as `loss_<name>_<part>`)."""

    def __init__(self, cfg: ObjectiveConfig, arch):
        super().__init__()
        self.cfg = cfg
        self.weights = active_weights(cfg)
        self.terms = nn.ModuleDict({name: TERMS[name](cfg, arch) for name in self.weights})
        self.features_only = all(t.features_only for t in self.terms.values())
        self.needs_tokens = any(t.needs_tokens for t in self.terms.values())
        self.ssl_views = max(t.ssl_views for t in self.terms.values())
        pyramid = "pyramid" in self.terms
        # the views the encoder embeds, by batch key (terms look them up by key)
        self.image_keys = ["images", "images_1"][:2 if pyramid else cfg.image_views]
        self.text_keys = ["text"] + ["text_eda"] * cfg.text_eda + ["text_summary", "text_tags"] * pyramid
        self.rois = pyramid and cfg.pyramid.rois > 0
        self.multi_view = len(self.image_keys) > 1 or len(self.text_keys) > 1 or "mixup" in self.terms

    def recipe(self) -> BatchRecipe:
        """What the loader must put in each batch for these terms."""
        cfg, pyramid = self.cfg, "pyramid" in self.terms
        return BatchRecipe(views=len(self.image_keys), view_augment="pyramid" if pyramid else cfg.view_augment,
                           ssl_views=self.ssl_views, caption_augment=cfg.caption_augment, text_eda=cfg.text_eda,
                           eda_synonyms=cfg.eda_synonyms,
                           mlm_probability=cfg.mlm.probability if masks_captions(cfg) else 0.0,
                           text_levels=pyramid, max_rois=cfg.pyramid.rois if self.rois else 0,
                           roi_dim=cfg.pyramid.roi_dim if self.rois else 0)

    def prepare(self, batch: dict) -> dict:
        """Changes to the batch before the forward (ZeroVL's pixel mixup)."""
        for term in self.terms.values():
            batch = term.prepare(batch)
        return batch

    def encode(self, encoder, batch: dict) -> dict:
        """What the terms score, from a batch on the encoder's device and in its dtype: the
        encoder's forward, plus SLIP's trunk features of the ssl views, the joint-space
        embeddings (before normalization) of every image and text view by batch key
        (DeCLIP's multi-view terms, SimSiam, PyramidCLIP's levels, ZeroVL's text mixup) and
        PyramidCLIP's region embedding."""
        # token dropping (model.token_drop) thins the main image view only: the other views
        # (DeCLIP's, SLIP's, PyramidCLIP's) and the regions see every token
        out = encoder(batch["images"], batch["text"], return_tokens=self.needs_tokens, keep=batch.get("token_keep"))
        if self.ssl_views:
            out["ssl_trunk"] = [encoder.image_trunk(batch[f"ssl_{i}"]) for i in range(self.ssl_views)]  # (B, Dv)
        if self.multi_view:
            out["image_views"] = {"images": out["image_embedding"],
                                  **{key: encoder.encode_image(batch[key]) for key in self.image_keys[1:]}}
            out["text_views"] = {"text": out["text_embedding"],
                                 **{key: encoder.encode_text(batch[key]) for key in self.text_keys[1:]}}
        if self.rois:
            out["roi_embedding"] = encoder.encode_rois(batch["rois"], batch["roi_mask"])  # (B, E)
        return out

    def forward(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        parts = {}
        for name, term in self.terms.items():
            value, own = term(out, batch)
            parts.update({f"loss_{name}_{part}": v for part, v in own.items()})
            parts[f"loss_{name}"] = value
        total = sum(self.weights[name] * parts[f"loss_{name}"] for name in self.terms)
        return total, parts


class TrainModule(nn.Module):
    """What DeepSpeed wraps, trains and checkpoints: the encoder (SharedCLIP) and the
    objective, whose heads train and save with it (state-dict names `encoder.*`,
    `objective.terms.<name>.*`). `forward(batch)` is one engine forward per micro-batch
    (ZeRO-3 gathers parameters in it; exact accumulation re-runs it): the encoding the
    objective asks for and, unless `score=False`, the objective's (loss, parts)."""

    def __init__(self, encoder: nn.Module, objective: ComposedObjective):
        super().__init__()
        self.encoder, self.objective = encoder, objective

    def forward(self, batch: dict, score: bool = True):
        out = self.objective.encode(self.encoder, batch)
        return self.objective(out, batch) if score else out

    # ---- what the engine code and the evaluator read -----------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        return self.encoder.shared_parameters()

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def logit_scale_bounds(self) -> list[tuple[nn.Parameter, float, float]]:
        """Every learned log-temperature with the range it is clamped to after each update
        (and before the first step): the encoder's [objective.logit_scale_min, ln 100]
        (CLIP; DeCLIP's floor 3) and FILIP's own [filip.logit_scale_min, filip.logit_scale_max]."""
        cfg = self.objective.cfg
        bounds = [(self.encoder.logit_scale, cfg.logit_scale_min, MAX_LOGIT_SCALE)]
        if "filip" in self.objective.terms:
            bounds.append((self.objective.terms["filip"].heads.logit_scale, cfg.filip.logit_scale_min,
                           cfg.filip.logit_scale_max))
        return bounds

    @property
    def similarity(self) -> str:
        return trained_similarity(self.objective.cfg)

    def export_heads(self) -> dict[str, str]:
        """Export prefix -> state-dict prefix of the heads evaluation keeps: FILIP's token
        heads (token-wise evaluation needs them); empty without FILIP."""
        return {EXPORT_PREFIX: "objective.terms.filip.heads."} if "filip" in self.objective.terms else {}
