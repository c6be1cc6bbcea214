"""What a batch carries: the objective's order to the loader.

A batch always has `images` (N, 3, H, W), `text` (N, L) and `keys`; a `BatchRecipe` asks
for more. The objective builds it (pipeline/objectives.py `ComposedObjective.recipe`), the
loader follows it (pipeline/data/loader.py). Frozen and typed: a misspelt field is an
error where the recipe is written, not a key the loader never reads.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchRecipe:
    # augmented views of each image: images, images_1
    views: int = 1
    # the views' augmentation: "clip" (train RRC), "moco" (DeCLIP's MoCo v2 views),
    # "pyramid" (PyramidCLIP: view 0 a global crop of 90-100%, view 1 a local one of
    # 50-100%) or "zerovl" (a crop of 60-100% + AutoAugment)
    view_augment: str = "clip"
    # self-supervised views (SLIP): ssl_0, ssl_1, ... with SimCLR's augmentation
    ssl_views: int = 0
    ssl_augment: str = "simclr"
    # ZeroVL's caption augmentation of `text` ("zerovl": pipeline/data/caption_augment.py)
    caption_augment: str = "none"
    # DeCLIP: an EDA text view (text_eda) with these synonyms, and MLM masking of `text`
    # at this rate (mlm_labels); 0: clean captions
    text_eda: bool = False
    eda_synonyms: str = "wordnet"
    mlm_probability: float = 0.0
    # PyramidCLIP: summary and tags text levels (text_summary, text_tags) and region
    # features (rois, roi_mask: up to max_rois of roi_dim each) (pipeline/data/pyramid.py)
    text_levels: bool = False
    max_rois: int = 0
    roi_dim: int = 0
    # token dropping (model.token_drop): each sample's kept patch positions (token_keep, (k,))
    # drawn from its seed, out of image_tokens; 0: none drawn
    token_drop: float = 0.0
    image_tokens: int = 0


@dataclass(frozen=True)
class ImageSpec:
    """The model's input images: side length and the normalization of its pretraining."""
    size: int
    normalization: str
