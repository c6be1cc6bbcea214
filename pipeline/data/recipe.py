"""What the loader is asked for: what a batch carries (`BatchRecipe`, the objective's
order), the model's images (`ImageSpec`), and everything a reader process needs
(`StreamSpec`).

A batch always has `images` (N, 3, H, W), `text` (N, L) and `keys`; a `BatchRecipe` asks
for more. The objective builds it (pipeline/objectives.py `ComposedObjective.recipe`), the
loader follows it (pipeline/data/loader.py). Frozen and typed: a misspelt field is an
error where the recipe is written, not a key the loader never reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import DataConfig
from pipeline.data.remote import ReadPolicy
from pipeline.data.shards import ShardSet


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


@dataclass
class StreamSpec:
    """Everything a reader process needs (picklable): the run's `data` section as it is
    (never copied field by field), the shards and read policy it resolved to, what the
    stream is for, and where this epoch stands."""
    data: DataConfig
    shards: ShardSet
    read: ReadPolicy  # timeouts and retries of every remote read (pipeline/data/remote.py)
    recipe: BatchRecipe
    image: ImageSpec
    context_length: int
    batch_size: int  # this rank's samples per step (micro batch x accumulation)
    seed: int = 0
    rank: int = 0
    world: int = 1
    train: bool = True  # augmented, shuffled, watched for stalls; else the eval transform, in order
    keep_captions: bool = False
    drop_last: bool = True
    # uint8 pixels in the batch (with its "normalization" name) instead of normalized
    # floats: the trainer normalizes on its device (pipeline.pixels.normalize)
    uint8: bool = False
    # where this epoch stands: batches this rank already took, and per virtual reader
    # {"raw": n, "good": n, "truncated": n, "skipped": {reason: n}, "end": bool}
    epoch: int = 0
    start_batch: int = 0
    resume: dict[int, dict] = field(default_factory=dict)

    @property
    def readers(self) -> int:
        """data.readers: the virtual readers of all ranks together."""
        return self.data.readers

    @property
    def local_readers(self) -> int:
        return self.data.readers // self.world

    @property
    def active_workers(self) -> int:
        """Loader workers that own readers (workers beyond the rank's readers would idle)."""
        return max(1, min(self.data.workers, self.local_readers))

    @property
    def shuffle_buffer(self) -> int:
        """Per virtual reader (data.shuffle_buffer is the rank's); none outside training."""
        return -(-self.data.shuffle_buffer // self.data.readers) if self.train else 0

    @property
    def stall_seconds(self) -> float:
        """A training reader with no good sample for this long ends its stream as stalled
        (0: never); a stream read to its end is not watched."""
        return self.data.stall_seconds if self.train else 0.0

    def worker_of(self, position: int) -> int:
        """The worker that serves this rank's `position`-th sample of the epoch (see DataStream)."""
        return position % self.local_readers % self.active_workers
