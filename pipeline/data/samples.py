"""Per-sample work and collation, as a batch recipe asks (pipeline/data/recipe.py): decode,
every image view with its augmentation, the EDA caption, PyramidCLIP's text levels and
regions per sample; tokenizing, ZeroVL's caption augmentation, MLM masking and token
dropping's kept positions per batch.

Every random draw, the per-batch ones (ZeroVL's caption augmentation, MLM masking, the
kept tokens) included, is seeded per sample from its virtual reader and its position in
that reader's stream (`sample_seed`): a resumed stream that skipped a prefix without
decoding it draws the same crops and masks as the straight run, and a sample draws the
same whichever rank and worker read it and whichever batch it lands in
(pipeline/data/loader.py).
"""
from __future__ import annotations

import math
import random
import torch

from pipeline.data import pyramid
from pipeline.data.caption_augment import mlm_mask, zerovl_augment
from pipeline.data.decode import BadSample, decode_sample
from pipeline.data.eda import eda, load_synonyms
from pipeline.data.recipe import StreamSpec
from pipeline.data.transforms import (SSL_CROP_SCALES, ZEROVL_CROP_SCALE, eval_transform, ssl_transform,
                                      train_transform, zerovl_transform)
from pipeline.model.token_drop import draw_keep
from pipeline.pixels import PIXEL_KEYS
from pipeline.tokenizer import get_tokenizer

# PyramidCLIP's image pyramid: a global crop (90-100% of the image), a local one (50-100%).
PYRAMID_CROP_SCALES = ((0.9, 1.0), (0.5, 1.0))


def sample_seed(*parts: int) -> int:
    # Python's hash of a tuple of ints is deterministic across processes and runs
    # (only str/bytes hashing is randomized), and ~100x cheaper than a SeedSequence.
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class BatchMaker:
    """Samples -> batches. A sample's `ids` (seed, epoch, virtual reader) and its position
    in that reader's stream seed its draws."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.recipe = spec, spec.recipe
        recipe, size = spec.recipe, spec.image.size
        normalization = None if spec.uint8 else spec.image.normalization
        if not spec.train:
            self.view_transforms = [eval_transform(size, normalization)] * recipe.views
        elif recipe.view_augment == "moco":
            self.view_transforms = [ssl_transform(size, normalization, "moco")] * recipe.views
        elif recipe.view_augment == "zerovl":
            self.view_transforms = [zerovl_transform(size, normalization)] * recipe.views
        elif recipe.view_augment == "pyramid":
            self.view_transforms = [train_transform(size, normalization, scale)
                                    for scale in PYRAMID_CROP_SCALES[:recipe.views]]
        else:
            self.view_transforms = [train_transform(size, normalization, spec.data.rrc_scale)] * recipe.views
        self.ssl_transform = ssl_transform(size, normalization, recipe.ssl_augment) if recipe.ssl_views else None
        self.synonyms = load_synonyms(recipe.eda_synonyms) if recipe.text_eda else None
        # The smallest short side every transform here can use at full resolution: a crop of
        # area fraction s needs sqrt(1/s) x image_size pixels of source to be upscaled from.
        scales = [1.0]
        if spec.train:
            scales.append({"moco": SSL_CROP_SCALES["moco"][0], "pyramid": min(s[0] for s in PYRAMID_CROP_SCALES),
                           "zerovl": ZEROVL_CROP_SCALE[0]}.get(recipe.view_augment, spec.data.rrc_scale[0]))
            if recipe.ssl_views:
                scales.append(SSL_CROP_SCALES[recipe.ssl_augment][0])
        self.draft_size = math.ceil(size / math.sqrt(min(scales))) if spec.data.jpeg_draft else 0

    def sample(self, sample: dict, ids: tuple[int, ...], position: int) -> dict:
        """A raw webdataset sample -> its views and captions, or BadSample(reason)."""
        image, caption = decode_sample(sample, self.draft_size, self.spec.data.max_image_pixels,
                                       self.spec.data.max_caption_bytes)
        out = {"caption": caption, "key": f"{sample['__url__']}#{sample['__key__']}", "seed": (*ids, position)}
        views = [("images" if v == 0 else f"images_{v}", t) for v, t in enumerate(self.view_transforms)]
        views += [(f"ssl_{v}", self.ssl_transform) for v in range(self.recipe.ssl_views)]
        for index, (name, transform) in enumerate(views):
            # The CPU generator only: torch.manual_seed would also queue lazy CUDA/XPU/MTIA
            # seeding calls, each capturing a stack trace (a third of the loader's time).
            cpu_rng = torch.default_generator
            saved = cpu_rng.get_state()
            cpu_rng.manual_seed(sample_seed(*ids, position, index))
            out[name] = transform(image)
            cpu_rng.set_state(saved)
        if self.synonyms is not None:
            out["caption_eda"] = eda(caption, random.Random(sample_seed(*ids, position, -1)), self.synonyms)
        if self.recipe.text_levels:
            meta = pyramid.metadata(sample)
            out["caption_summary"] = pyramid.summary_text(caption, meta)
            out["caption_tags"] = pyramid.tags_text(caption, meta)
        if self.recipe.max_rois:
            rois = pyramid.read_rois(sample, self.recipe.max_rois, self.recipe.roi_dim)
            if rois is None:
                raise BadSample("missing_roi")
            out["rois"], out["roi_mask"] = rois
        return out

    def batch(self, items: list[dict]) -> dict:
        """Samples -> one batch: stacked views, tokenized (and augmented or masked) captions,
        the sample keys."""
        spec, tokenize = self.spec, get_tokenizer()
        captions = [it["caption"] for it in items]
        out = {key: torch.stack([it[key] for it in items]) for key in items[0]
               if key.startswith((*PIXEL_KEYS, "roi"))}
        out["text"] = tokenize(captions, spec.context_length)
        if self.recipe.text_eda:
            out["text_eda"] = tokenize([it["caption_eda"] for it in items], spec.context_length)
        if self.recipe.text_levels:
            for level in ("summary", "tags"):
                out[f"text_{level}"] = tokenize([it[f"caption_{level}"] for it in items], spec.context_length)
        if self.recipe.caption_augment == "zerovl":
            out["text"] = per_sample(items, out["text"], -3, zerovl_augment)
        if self.recipe.mlm_probability:
            # DeCLIP feeds the masked ids to the one text forward that serves both MLM and the
            # contrastive terms (Sense-GVT/DeCLIP prototype/model/declip.py).
            masked = [mlm_mask(out["text"][i:i + 1], prob=self.recipe.mlm_probability,
                               generator=torch.Generator().manual_seed(sample_seed(*it["seed"], -2)))
                      for i, it in enumerate(items)]
            out["text"] = torch.cat([ids for ids, _ in masked])
            out["mlm_labels"] = torch.cat([labels for _, labels in masked])
        if self.recipe.token_drop:
            out["token_keep"] = torch.stack([
                draw_keep(self.recipe.image_tokens, self.recipe.token_drop,
                          torch.Generator().manual_seed(sample_seed(*it["seed"], -4))) for it in items])
        if spec.uint8:
            out["normalization"] = spec.image.normalization  # what the trainer applies to the pixels
        out["keys"] = [it["key"] for it in items]  # "<shard url>#<sample key>": which samples a batch holds
        if spec.keep_captions:
            out["captions"] = captions
        return out


def per_sample(items: list[dict], text: torch.Tensor, salt: int, augment) -> torch.Tensor:
    """`augment(rows, generator)` row by row, each with its own sample's seed."""
    return torch.cat([augment(text[i:i + 1], torch.Generator().manual_seed(sample_seed(*it["seed"], salt)))
                      for i, it in enumerate(items)])
