"""Streaming webdataset loader: shards -> decoded, augmented, tokenized batches.

Properties the trainer relies on:

* **Split by rank and worker.** Without resampling each shard goes to exactly one
  (rank, worker) per epoch (`assign_shards`), so an epoch reads every sample once.
  With resampling each reader draws shards with replacement (weighted by their
  sample counts) from its own seeded stream.
* **Deterministic.** Shard order, the shuffle buffer and every augmentation are seeded
  from (seed, epoch, rank, worker, sample index), so the same seed and epoch give the
  same batches, whatever the process timing.
* **Resumable.** Each batch carries, per worker, how many raw samples that worker has
  pulled from its shuffled stream. `DataStream.state_dict()` holds these; a resumed
  stream skips exactly that many raw samples per worker before decoding anything, so
  no sample is seen twice or skipped.
* **Bad data is skipped and counted, never fatal.** Unreadable or truncated tars,
  missing/empty/undecodable images, missing/empty captions: each is counted by reason
  (`SKIP_REASONS`) and the stream goes on. (webdataset's `warn_and_continue` is not
  used: it sleeps half a second per exception.) A skip rate above
  `data.max_skip_rate` stops the run with `DataQualityError`.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import logging
import math
import multiprocessing.util  # noqa: F401 (its exit function is registered before ours)
import random
import tarfile
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import pyramid
from pipeline.data.caption_augment import mlm_mask, zerovl_augment
from pipeline.data.eda import eda, load_synonyms
from pipeline.data.recipe import BatchRecipe, ImageSpec
from pipeline.data.shards import ShardSet, assign_shards, batches_per_epoch, debiased_sources, resolve_shards
from pipeline.data.transforms import (SSL_CROP_SCALES, ZEROVL_CROP_SCALE, eval_transform, ssl_transform,
                                      train_transform, zerovl_transform)
from pipeline.pixels import PIXEL_KEYS
from pipeline.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable_shard", "truncated_shard", "missing_image", "empty_image", "undecodable_image",
                "oversized_image", "missing_caption", "empty_caption", "missing_roi", "oversized_member",
                "unsafe_member", "duplicate_member")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# The skip-rate ceiling is checked once this many samples have been read, so that one
# bad sample among the first few does not stop a run.
MIN_SAMPLES_FOR_SKIP_RATE = 200
# PyramidCLIP's image pyramid: a global crop (90-100% of the image), a local one (50-100%).
PYRAMID_CROP_SCALES = ((0.9, 1.0), (0.5, 1.0))


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DataQualityError(RuntimeError):
    pass


class Stalled(Exception):
    """A reader got no good sample within data.stall_seconds (raised inside its stream)."""


@dataclass
class StreamSpec:
    """Everything a reader process needs (picklable)."""
    shards: ShardSet
    batch_size: int
    image_size: int
    normalization: str
    context_length: int
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world: int = 1
    num_workers: int = 1
    resampled: bool = False
    shuffle_buffer: int = 0
    train: bool = True
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    recipe: BatchRecipe = BatchRecipe()
    keep_captions: bool = False
    drop_last: bool = True
    jpeg_draft: bool = True
    # uint8 pixels in the batch (with its "normalization" name) instead of normalized
    # floats: the trainer normalizes on its device (pipeline.pixels.normalize)
    uint8: bool = False
    # a reader with no good sample for this long ends its stream as stalled (0: never)
    stall_seconds: float = 0.0
    # images declaring more pixels are skipped before decoding (0: no limit)
    max_image_pixels: int = 0
    # captions are cut to this many bytes before tokenizing (0: no limit); tar members
    # larger than max_member_bytes are never read (0: no limit)
    max_caption_bytes: int = 0
    max_member_bytes: int = 0
    # worker -> {"raw": n, "good": n, "truncated": n, "skipped": {reason: n}} already consumed this epoch
    resume: dict[int, dict] = field(default_factory=dict)


def decode_sample(sample: dict, draft_size: int = 0, max_pixels: int = 0,
                  max_caption_bytes: int = 0) -> tuple[Image.Image, str]:
    """Raw webdataset sample -> (RGB image, caption), or BadSample(reason).

    max_caption_bytes > 0: the caption's bytes are cut there before decoding (a character
    split by the cut is dropped).

    max_pixels > 0: an image whose header declares more pixels is skipped as
    oversized_image before anything is decoded (a few hundred bytes of PNG can declare
    gigabytes of pixels); above twice Pillow's own limit Image.open refuses it first.

    draft_size > 0: JPEGs whose short side is at least twice that are decoded at a reduced
    scale (libjpeg's DCT scaling, 1/2 .. 1/8, PIL's `draft`) that keeps the short side >=
    draft_size: most of the decode is skipped when the shards are much larger than what
    the transform keeps."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample("missing_image")
    data = sample[key]
    if not data:
        raise BadSample("empty_image")
    if "txt" not in sample:
        raise BadSample("missing_caption")
    raw_caption = sample["txt"][:max_caption_bytes] if max_caption_bytes else sample["txt"]
    caption = raw_caption.decode("utf-8", errors="replace")
    if len(raw_caption) < len(sample["txt"]):
        caption = caption.rstrip("\ufffd")  # the cut's half character
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if max_pixels and image.size[0] * image.size[1] > max_pixels:
            raise BadSample("oversized_image")
        if draft_size and image.format == "JPEG" and min(image.size) >= 2 * draft_size:
            scale = min(image.size) / draft_size
            image.draft("RGB", (math.ceil(image.size[0] / scale), math.ceil(image.size[1] / scale)))
        image = image.convert("RGB")  # forces a full decode: truncated files fail here
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample("oversized_image") from None
    except Exception:  # PIL raises many types for corrupt data
        raise BadSample("undecodable_image") from None
    return image, caption


def tar_members(sources, max_member_bytes: int, reject, handler):
    """webdataset's tar_file_expander, with what it would read blindly refused first: a
    member larger than `max_member_bytes` (0: no limit) is never read (webdataset reads a
    member whole into memory), and a member that is not a regular file (a link, a device)
    or whose name climbs out of the shard ("../", an absolute path) is not read either;
    both are reported as `reject(url, member name, "oversized_member" | "unsafe_member")`
    and yielded empty, so that their sample still arrives to be counted. Directories are
    structure, not data. Gzip'd tars read as plain ones (mode r|*). A shard that fails
    goes to `handler(exception)` with its url last in the exception's args (webdataset's
    convention); False stops."""
    for source in sources:
        url = source["url"]
        try:
            tar = tarfile.open(fileobj=source["stream"], mode="r|*")
            for info in tar:
                tar.members = []  # a stream: keep no TarInfo of what was read
                name = info.name
                if info.isdir() or name.startswith("__"):  # webdataset's own metadata members
                    continue
                unsafe = not info.isreg() or name.startswith("/") or ".." in PurePosixPath(name).parts
                if unsafe or (max_member_bytes and info.size > max_member_bytes):
                    reject(url, name, "unsafe_member" if unsafe else "oversized_member")
                    data = b""
                else:
                    data = tar.extractfile(info).read()
                yield {"fname": name, "data": data, "__url__": url, "url": url}
        except Exception as exn:  # noqa: BLE001 (what webdataset's expander hands its handler)
            exn.args = (*exn.args, url)
            if not handler(exn):
                break
        finally:
            with contextlib.suppress(Exception):
                source["stream"].close()


def sample_seed(*parts: int) -> int:
    # Python's hash of a tuple of ints is deterministic across processes and runs
    # (only str/bytes hashing is randomized), and ~100x cheaper than a SeedSequence.
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class _Reader:
    """One worker's pass: tar stream -> shuffle -> skip -> decode -> batches."""

    def __init__(self, spec: StreamSpec, worker: int):
        self.spec, self.worker = spec, worker
        state = spec.resume.get(worker, {})
        self.skip = int(state.get("raw", 0))
        self.raw = 0
        self.good = int(state.get("good", 0))
        self.truncated = int(state.get("truncated", 0))  # captions cut at max_caption_bytes
        # (shard url, sample key) -> why the sample is skipped, found while reading its tar
        # members (the sample itself arrives later, from webdataset's grouping)
        self.rejected: dict[tuple[str, str], str] = {}
        self.skipped = Counter(state.get("skipped", {}))
        self.per_url: Counter = Counter()
        self.expected = dict(zip(spec.shards.urls, spec.shards.samples))  # the manifest's count per shard
        self.flagged: set[str] = set()
        self.lost_by_shard: Counter = Counter()  # which shards cost the most, for the messages
        self.last_good = time.monotonic()
        normalization = None if spec.uint8 else spec.normalization
        if not spec.train:
            self.view_transforms = [eval_transform(spec.image_size, normalization)] * spec.recipe.views
        elif spec.recipe.view_augment == "moco":
            self.view_transforms = [ssl_transform(spec.image_size, normalization, "moco")] * spec.recipe.views
        elif spec.recipe.view_augment == "zerovl":
            self.view_transforms = [zerovl_transform(spec.image_size, normalization)] * spec.recipe.views
        elif spec.recipe.view_augment == "pyramid":
            self.view_transforms = [train_transform(spec.image_size, normalization, scale)
                                    for scale in PYRAMID_CROP_SCALES[:spec.recipe.views]]
        else:
            self.view_transforms = ([train_transform(spec.image_size, normalization, spec.rrc_scale)]
                                    * spec.recipe.views)
        self.synonyms = load_synonyms(spec.recipe.eda_synonyms) if spec.recipe.text_eda else None
        # The smallest short side every transform here can use at full resolution: a crop of
        # area fraction s needs sqrt(1/s) x image_size pixels of source to be upscaled from.
        scales = [1.0]
        if spec.train:
            scales.append({"moco": SSL_CROP_SCALES["moco"][0], "pyramid": min(s[0] for s in PYRAMID_CROP_SCALES),
                           "zerovl": ZEROVL_CROP_SCALE[0]}.get(spec.recipe.view_augment, spec.rrc_scale[0]))
            if spec.recipe.ssl_views:
                scales.append(SSL_CROP_SCALES[spec.recipe.ssl_augment][0])
        self.draft_size = math.ceil(spec.image_size / math.sqrt(min(scales))) if spec.jpeg_draft else 0
        self.ssl_transform = (ssl_transform(spec.image_size, normalization, spec.recipe.ssl_augment)
                              if spec.recipe.ssl_views else None)
        self.ids = (spec.seed, spec.epoch, spec.rank, worker)

    def count(self, reason: str, url: str, samples: int = 1):
        if self.raw >= self.skip:  # the skipped prefix was counted before the checkpoint
            self.skipped[reason] += samples
            self.lost_by_shard[url] += samples
        self.check_stall()

    def check_stall(self):
        """Called on every failure (a shard or a sample) and before every shard: a stream
        in which everything fails never blocks, it spins through the shards."""
        waited = time.monotonic() - self.last_good
        if self.spec.stall_seconds and waited > self.spec.stall_seconds:
            reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.most_common()) or "none"
            raise Stalled(f"no good sample in {waited:.0f} s, over data.stall_seconds={self.spec.stall_seconds:g} "
                          f"(rank {self.spec.rank}, worker {self.worker}); skipped: {reasons}; shards that cost "
                          f"the most: {costliest(self.lost_by_shard)}. Check the shards with "
                          f"`python -m data_prep.verify`.")

    def lost_samples(self, url: str) -> int:
        """The samples a shard that broke off loses: what its manifest lists beyond those
        already read (at least 1: a shard without a count still counts). An unreadable
        shard counted as one bad sample let a run with half its data gone pass
        data.max_skip_rate at 2% (issue 22)."""
        expected = self.expected.get(url, 0)
        return max(1, expected - self.per_url[url])

    def on_tar_error(self, exn: Exception) -> bool:
        message = str(exn.args[0]) if exn.args else type(exn).__name__
        if isinstance(exn, ValueError) and "duplicate file name in tar file" in message:
            # webdataset drops the second copy and reads on; which copy is right is unknown,
            # so the sample is skipped (duplicate_member), and only it
            name = message.split(":")[0]
            url = exn.args[-1] if isinstance(exn.args[-1], str) else ""
            self.reject(url, name, "duplicate_member")
            log.warning("shard %s: tar member %s appears twice in its sample; the sample is skipped, the shard "
                        "reads on", url, name)
            return True
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else ""  # webdataset appends the url
        truncated = isinstance(exn, (tarfile.ReadError, EOFError)) and self.per_url[url] > 0
        if url not in self.flagged:
            self.flagged.add(url)
            if isinstance(exn, FileNotFoundError):
                log.warning("shard %s: listed in the manifest but missing on disk; skipping it", url)
            else:
                log.warning("shard %s: %s (%s); skipping the rest of it", url,
                            "truncated" if truncated else "unreadable",
                            exn.strerror if isinstance(exn, OSError) and exn.strerror else message)
            self.count("truncated_shard" if truncated else "unreadable_shard", url, self.lost_samples(url))
        return True  # keep going with the next shard

    def urls(self):
        spec = self.spec
        if spec.resampled:
            rng = random.Random(f"resample:{spec.seed}:{spec.epoch}:{spec.rank}:{self.worker}")
            weights = spec.shards.samples if spec.shards.total_samples else None
            while True:
                self.check_stall()
                yield dict(url=rng.choices(spec.shards.urls, weights=weights)[0])
        else:
            for i in assign_shards(spec.shards, spec.epoch, spec.seed, spec.rank, spec.world, self.worker,
                                   spec.num_workers):
                self.check_stall()
                yield dict(url=spec.shards.urls[i])

    def checked(self, samples):
        """Count samples per shard; a shard that ends short of its manifest count was truncated."""
        expected = self.expected
        current = None

        def close(url):
            if url is not None and url not in self.flagged and expected.get(url) and self.per_url[url] < expected[url]:
                self.flagged.add(url)
                self.count("truncated_shard", url, self.lost_samples(url))
                log.warning("shard %s ended after %d of %d samples (truncated)", url, self.per_url[url], expected[url])

        for sample in samples:
            url = sample["__url__"]
            if url != current:
                close(current)
                if self.spec.resampled:  # a shard can come round again
                    self.per_url[url] = 0
                    self.flagged.discard(url)
                current = url
            self.per_url[url] += 1
            yield sample
        close(current)

    def reject(self, url: str, member: str, reason: str):
        key, _ = wds.tariterators.base_plus_ext(member)
        if key is not None:
            self.rejected.setdefault((url, key), reason)

    def raw_samples(self):
        opened = wds.tariterators.url_opener(self.urls(), handler=self.on_tar_error)
        members = tar_members(opened, self.spec.max_member_bytes, self.reject, self.on_tar_error)
        grouped = wds.tariterators.group_by_keys(members, handler=self.on_tar_error)
        stream = self.checked(grouped)
        if self.spec.shuffle_buffer > 1:
            rng = random.Random(f"shuffle:{':'.join(map(str, self.ids))}")
            stream = wds.shuffle(self.spec.shuffle_buffer, initial=self.spec.shuffle_buffer // 2, rng=rng)(stream)
        return stream

    def process(self, sample: dict) -> dict:
        image, caption = decode_sample(sample, self.draft_size, self.spec.max_image_pixels,
                                       self.spec.max_caption_bytes)
        if self.spec.max_caption_bytes and len(sample["txt"]) > self.spec.max_caption_bytes:
            self.truncated += 1
        out = {"caption": caption, "key": f"{sample['__url__']}#{sample['__key__']}"}
        views = [("images" if v == 0 else f"images_{v}", t) for v, t in enumerate(self.view_transforms)]
        views += [(f"ssl_{v}", self.ssl_transform) for v in range(self.spec.recipe.ssl_views)]
        for index, (name, transform) in enumerate(views):
            # Seed each augmentation from the sample's position: a resumed stream that skipped
            # the prefix without decoding it still draws the same crops.
            # The CPU generator only: torch.manual_seed would also queue lazy CUDA/XPU/MTIA
            # seeding calls, each capturing a stack trace (a third of the loader's time).
            cpu_rng = torch.default_generator
            saved = cpu_rng.get_state()
            cpu_rng.manual_seed(sample_seed(*self.ids, self.raw, index))
            out[name] = transform(image)
            cpu_rng.set_state(saved)
        if self.synonyms is not None:
            out["caption_eda"] = eda(caption, random.Random(sample_seed(*self.ids, self.raw, -1)), self.synonyms)
        if self.spec.recipe.text_levels:
            meta = pyramid.metadata(sample)
            out["caption_summary"], out["caption_tags"] = pyramid.summary_text(caption, meta), pyramid.tags_text(caption, meta)
        if self.spec.recipe.max_rois:
            rois = pyramid.read_rois(sample, self.spec.recipe.max_rois, self.spec.recipe.roi_dim)
            if rois is None:
                raise BadSample("missing_roi")
            out["rois"], out["roi_mask"] = rois
        return out

    def batch(self, items: list[dict]) -> dict:
        captions = [it["caption"] for it in items]
        out = {key: torch.stack([it[key] for it in items]) for key in items[0]
               if key.startswith((*PIXEL_KEYS, "roi"))}
        out["text"] = get_tokenizer()(captions, self.spec.context_length)
        if self.spec.recipe.text_eda:
            out["text_eda"] = get_tokenizer()([it["caption_eda"] for it in items], self.spec.context_length)
        if self.spec.recipe.text_levels:
            for level in ("summary", "tags"):
                out[f"text_{level}"] = get_tokenizer()([it[f"caption_{level}"] for it in items], self.spec.context_length)
        if self.spec.recipe.caption_augment == "zerovl":
            generator = torch.Generator().manual_seed(sample_seed(*self.ids, self.raw, -3))
            out["text"] = zerovl_augment(out["text"], generator)
        if self.spec.recipe.mlm_probability:
            # DeCLIP feeds the masked ids to the one text forward that serves both MLM and the
            # contrastive terms (Sense-GVT/DeCLIP prototype/model/declip.py); seeded by the position, like the crops.
            generator = torch.Generator().manual_seed(sample_seed(*self.ids, self.raw, -2))
            out["text"], out["mlm_labels"] = mlm_mask(out["text"], prob=self.spec.recipe.mlm_probability,
                                                      generator=generator)
        if self.spec.uint8:
            out["normalization"] = self.spec.normalization  # what the trainer applies to the pixels
        out["keys"] = [it["key"] for it in items]  # "<shard url>#<sample key>": which samples a batch holds
        if self.spec.keep_captions:
            out["captions"] = captions
        out["meta"] = self.meta()
        return out

    def meta(self, end: bool = False) -> dict:
        return {"worker": self.worker, "raw": self.raw, "good": self.good, "truncated": self.truncated,
                "skipped": dict(self.skipped), "end": end,
                "costly": dict(self.lost_by_shard.most_common(3))}

    def __iter__(self):
        items = []
        try:
            for sample in self.raw_samples():
                self.raw += 1
                rejected = self.rejected.pop((sample["__url__"], sample["__key__"]), None)
                if self.raw <= self.skip:
                    self.last_good = time.monotonic()  # a resumed stream's fast-forward is progress
                    continue
                try:
                    if rejected:
                        raise BadSample(rejected)
                    items.append(self.process(sample))
                except BadSample as bad:
                    self.count(bad.reason, sample["__url__"])
                    continue
                self.good += 1
                self.last_good = time.monotonic()
                if len(items) == self.spec.batch_size:
                    yield self.batch(items)
                    items = []
                    # the consumer asked for more: time it spent elsewhere (a long evaluation,
                    # a checkpoint) is not a stall of this reader
                    self.last_good = time.monotonic()
        except Stalled as stalled:  # the trainer's process raises it (DataStream), with this message
            yield {"meta": {**self.meta(end=True), "stalled": str(stalled)}}
            return
        if items and not self.spec.drop_last:
            yield self.batch(items)
        # An end marker: the stream knows at once that this worker is done (and its final
        # counters, including bad samples after its last batch).
        yield {"meta": self.meta(end=True)}


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        info = get_worker_info()
        return iter(_Reader(self.spec, info.id if info else 0))


# Loader workers ignore SIGTERM (below), and SIGTERM-then-join-without-timeout is how
# Python's multiprocessing ends daemonic children at exit: a DataLoader iterator still
# alive then (held by a traceback, an abandoned generator) hung the interpreter forever.
# Workers still alive at exit are killed instead (atexit runs last-registered first, so
# this runs before multiprocessing's own exit function).
_live_workers: "weakref.WeakSet" = weakref.WeakSet()


def _kill_live_workers():
    import signal
    # torch's SIGCHLD handler would raise "worker killed by signal" into this function
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in list(_live_workers):
        if worker.is_alive():
            worker.kill()
            worker.join(5)


atexit.register(_kill_live_workers)


def end_workers(loader):
    """Shut a DataLoader iterator's workers down (torch's own way: an end message, a join
    with a timeout) and kill those that did not go (SIGTERM, torch's last resort, is
    ignored by them)."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(loader, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def leave_stop_signals_to_the_trainer(worker_id: int):
    """SLURM's preemption SIGTERM (and Ctrl-C's SIGINT) reach every process of the job,
    loader workers included; a worker killed by it made the trainer raise "DataLoader
    worker is killed by signal" in the middle of the step it was to finish and save. The
    trainer decides when to stop (pipeline/lifecycle.py StopRequest); workers end with it (the
    DataLoader's shutdown, or its watchdog on the parent's death)."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DataStream:
    """The trainer's view of the data: epochs of batches, skip counters, and a position
    (`state_dict`) that a resumed run continues from exactly."""

    def __init__(self, cfg: DataConfig, recipe: BatchRecipe = BatchRecipe(), *, batch_size: int,
                 image: ImageSpec, context_length: int, seed: int = 0, rank: int = 0, world: int = 1,
                 train: bool = True, keep_captions: bool = False, drop_last: bool = True, uint8: bool = False,
                 shards: ShardSet | None = None):
        self.cfg = cfg
        self.shards = shards or resolve_shards(cfg.train_shards)
        self.base = StreamSpec(shards=self.shards, batch_size=batch_size, image_size=image.size,
                               normalization=image.normalization, context_length=context_length, seed=seed,
                               rank=rank, world=world, num_workers=max(1, cfg.workers), resampled=cfg.resampled,
                               shuffle_buffer=cfg.shuffle_buffer if train else 0, train=train,
                               rrc_scale=cfg.rrc_scale, recipe=recipe, keep_captions=keep_captions,
                               drop_last=drop_last, jpeg_draft=cfg.jpeg_draft, uint8=uint8,
                               stall_seconds=cfg.stall_seconds if train else 0.0,
                               max_image_pixels=cfg.max_image_pixels, max_caption_bytes=cfg.max_caption_bytes,
                               max_member_bytes=cfg.max_member_bytes)
        self.epoch = 0
        self.epoch_step = 0  # batches taken this epoch through `forever`
        # A stream used alone checks data.max_skip_rate on its own counters after every
        # batch; the trainer turns this off and checks the counters of all ranks on log
        # steps (pipeline/trainer.py), so that every rank stops together, on the whole picture.
        self.local_skip_check = True
        self.workers: dict[int, dict] = {}  # this epoch's per-worker position
        self.next_worker = 0  # whose batch comes next in the round-robin
        self.done = {"good": 0, "truncated": 0, "skipped": Counter()}  # finished epochs
        self.costly: dict[int, dict] = {}  # per worker: the shards that lost the most samples

    # ---- position ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step,
                "workers": {int(w): dict(s) for w, s in self.workers.items()},
                "next_worker": self.next_worker,
                "done": {"good": self.done["good"], "truncated": self.done["truncated"],
                         "skipped": dict(self.done["skipped"])}}

    def load_state_dict(self, state: dict):
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])
        self.workers = {int(w): dict(s) for w, s in state["workers"].items()}
        self.next_worker = int(state["next_worker"])
        self.done = {"good": int(state["done"]["good"]), "truncated": int(state["done"].get("truncated", 0)),
                     "skipped": Counter(state["done"]["skipped"])}

    # ---- counters ------------------------------------------------------------------
    def skipped(self) -> Counter:
        total = Counter(self.done["skipped"])
        for s in self.workers.values():
            total.update(s["skipped"])
        return total

    def good(self) -> int:
        return self.done["good"] + sum(s["good"] for s in self.workers.values())

    def truncated(self) -> int:
        """Captions cut at data.max_caption_bytes (the samples were used: not a skip)."""
        return self.done["truncated"] + sum(s.get("truncated", 0) for s in self.workers.values())

    def shard_losses(self) -> Counter:
        """Samples lost per shard on this rank (each worker reports its own top few)."""
        return sum((Counter(c) for c in self.costly.values()), Counter())

    def check_skip_rate(self):
        if self.local_skip_check:
            check_skip_rate(self.good(), self.skipped(), self.cfg.max_skip_rate, self.shard_losses)

    # ---- iteration -----------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        b = self.base
        return batches_per_epoch(self.shards, self.cfg, b.batch_size, b.world, b.seed, self.epoch)

    def forever(self):
        """The trainer's batches: endless, epoch after epoch. An epoch ends after
        `batches_per_epoch` batches (a resampled stream never runs out by itself) or when
        its data does; the position, `epoch_step` included, is `state_dict` at any point
        (a stream saved right after an epoch's last batch starts the next one)."""
        while True:
            per_epoch = self.batches_per_epoch()
            if self.epoch_step < per_epoch:
                epoch = iter(self)
                try:
                    for batch in epoch:
                        self.epoch_step += 1
                        yield batch
                        if self.epoch_step >= per_epoch:
                            break
                finally:  # the epoch's readers end here, not when the generator is collected
                    epoch.close()
            self.next_epoch()

    def __iter__(self):
        """Batches of the current epoch, from where the stream stands.

        The order is a strict round-robin over the workers that still have data, starting
        at `next_worker`: the DataLoader's own order, but one a resumed stream can restart
        in the middle of (the DataLoader always starts at worker 0)."""
        spec = StreamSpec(**{**self.base.__dict__, "epoch": self.epoch, "resume": dict(self.workers)})
        num_workers = self.cfg.workers
        loader = iter(DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                                 worker_init_fn=leave_stop_signals_to_the_trainer if num_workers else None))
        _live_workers.update(getattr(loader, "_workers", ()))
        try:
            yield from self._round_robin(loader, max(1, num_workers))
        finally:  # an error, the end, or an abandoned epoch: the workers go now, not at exit
            end_workers(loader)

    def _round_robin(self, loader, num_workers: int):
        queues = {w: deque() for w in range(num_workers)}
        active = [w for w in queues if not self.workers.get(w, {}).get("end")]
        fresh, delivered = not self.workers, 0
        while active:
            w = self.next_worker if self.next_worker in active else active[0]
            while not queues[w]:
                item = next(loader, None)
                if item is None:  # every worker has sent its end marker
                    queues[w].append({"meta": {**self.workers.get(w, {"raw": 0, "good": 0, "truncated": 0,
                                                                      "skipped": {}}),
                                               "worker": w, "end": True}})
                    break
                queues[item["meta"]["worker"]].append(item)
            batch = queues[w].popleft()
            meta = batch.pop("meta")
            if "stalled" in meta:
                raise DataQualityError(meta["stalled"])
            self.workers[w] = {**{k: meta[k] for k in ("raw", "good", "skipped", "end")},
                               "truncated": meta.get("truncated", 0)}  # absent from older checkpoints
            self.costly[w] = meta.get("costly", {})
            after = active[(active.index(w) + 1) % len(active)]
            if meta["end"]:
                active.remove(w)
            self.next_worker = after
            if not meta["end"]:
                self.check_skip_rate()
                delivered += 1
                yield batch
        if fresh and not delivered:  # every later epoch would be as empty: 18,114 of them in issue 22
            b = self.base
            reasons = ", ".join(f"{k}={v}" for k, v in self.skipped().most_common()) or "none"
            raise DataQualityError(
                f"epoch {self.epoch} gave rank {b.rank} no batch of {b.batch_size} (its {b.num_workers} reader(s) "
                f"ended first); skipped: {reasons}; shards that cost the most: "
                f"{costliest(self.shard_losses())}. Too few readable samples per rank and "
                f"worker: check the shards with `python -m data_prep.verify`, or use data.resampled: true")

    def next_epoch(self):
        """Close the current epoch (its counters go to the totals) and move on."""
        self.done["good"] = self.good()
        self.done["truncated"] = self.truncated()
        self.done["skipped"] = self.skipped()
        self.workers = {}
        self.next_worker = 0
        self.epoch_step = 0
        self.epoch += 1


def costliest(shard_losses: Counter, n: int = 3) -> str:
    return ", ".join(f"{url} ({lost})" for url, lost in shard_losses.most_common(n)) or "none failed"


def check_skip_rate(good: int, skipped: Counter, max_skip_rate: float, shard_losses=Counter):
    """`shard_losses()`: samples lost per shard, named in the message; called only when the
    check fails (the trainer's gathers every rank's, a collective: every rank fails together)."""
    bad = sum(skipped.values())
    seen = bad + good
    if seen >= MIN_SAMPLES_FOR_SKIP_RATE and bad / seen > max_skip_rate:
        reasons = ", ".join(f"{k}={v}" for k, v in skipped.most_common())
        raise DataQualityError(f"skipped {bad} of {seen} samples ({bad / seen:.1%}), above data.max_skip_rate="
                               f"{max_skip_rate}: {reasons}; shards that cost the most: "
                               f"{costliest(shard_losses())}. Check the shards with `python -m data_prep.verify`.")


def summed_over_ranks(good: int, truncated: int, skipped: Counter, device) -> tuple[int, int, Counter]:
    """(good, truncated captions, skipped by reason) summed over every rank: one
    all-reduce, so call it on every rank at the same point (the trainer's log steps). Each
    rank alone saw ~1/N of the bad samples (issue 22)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return good, truncated, skipped
    counts = torch.tensor([good, truncated, *(skipped.get(r, 0) for r in SKIP_REASONS)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(counts)
    total, cut, *by_reason = (int(c) for c in counts.tolist())
    return total, cut, Counter({r: n for r, n in zip(SKIP_REASONS, by_reason) if n})


def shard_losses_over_ranks(local: Counter) -> Counter:
    """Every rank's samples lost per shard, summed (a collective: all ranks call it)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(local))
    return sum((Counter(g) for g in gathered), Counter())


def choose_source(seed: int, step: int, sizes: list[int]) -> int:
    """ZeroVL's debiased sampling: the source of step `step`'s whole global batch, with
    probability proportional to its size. A pure function of (seed, step), so every rank
    draws the same source without communicating (ZeroVL's DGA runner uses a shared
    default_rng(2021) for the same reason)."""
    weights = np.asarray(sizes, dtype=np.float64)
    return int(np.random.default_rng([seed, step]).choice(len(sizes), p=weights / weights.sum()))


def make_stream(cfg: DataConfig, recipe: BatchRecipe, **kwargs) -> "DataStream | DebiasedStream":
    """The trainer's stream for data.sampling."""
    return (DebiasedStream(cfg, recipe, **kwargs) if cfg.sampling == "debiased"
            else DataStream(cfg, recipe, **kwargs))


class DebiasedStream:
    """`data.sampling: debiased`: one DataStream per "::"-separated source of
    data.train_shards; each step takes its batch from the source `choose_source` names, so
    the global batch never mixes sources. A source that runs out starts its next epoch;
    a trainer's "epoch" is the sum of the sources' epochs in batches. Same interface as
    DataStream (iteration, position, counters)."""

    def __init__(self, cfg: DataConfig, recipe: BatchRecipe = BatchRecipe(), *, seed: int = 0, **stream_kwargs):
        self.cfg, self.seed = cfg, seed
        sources = debiased_sources(cfg)
        self.sources = [DataStream(cfg, recipe, seed=seed, shards=shards, **stream_kwargs) for shards in sources]
        self.sizes = [shards.total_samples for shards in sources]
        self.step = 0

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.sources)

    def state_dict(self) -> dict:
        return {"step": self.step, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict):
        self.step = int(state["step"])
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)

    def skipped(self) -> Counter:
        return sum((s.skipped() for s in self.sources), Counter())

    @property
    def local_skip_check(self) -> bool:
        return self.sources[0].local_skip_check

    @local_skip_check.setter
    def local_skip_check(self, value: bool):
        for source in self.sources:
            source.local_skip_check = value

    def good(self) -> int:
        return sum(s.good() for s in self.sources)

    def truncated(self) -> int:
        return sum(s.truncated() for s in self.sources)

    def shard_losses(self) -> Counter:
        return sum((s.shard_losses() for s in self.sources), Counter())

    def batches_per_epoch(self) -> int:
        return sum(s.batches_per_epoch() for s in self.sources)

    def forever(self):
        """Endless already: sources roll over on their own when they run out."""
        return iter(self)

    def __iter__(self):
        iterators = {}
        while True:
            index = choose_source(self.seed, self.step, self.sizes)
            batch = None
            while batch is None:
                if index not in iterators:
                    iterators[index] = iter(self.sources[index])
                # this source's epoch is over: its next one (a new epoch with no batch raises)
                batch = next(iterators[index], None)
                if batch is None:
                    self.sources[index].next_epoch()
                    del iterators[index]
            self.step += 1
            batch["source"] = index
            yield batch
