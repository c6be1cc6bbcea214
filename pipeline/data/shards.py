"""Shard lists: resolving `data.train_shards`, and which shards a virtual reader reads.

A spec is one or more parts joined by "::" (as open_clip does); each part is a shard
directory with a manifest.yaml (data_prep.shard writes it) or a brace pattern of tar
files ("dir/{00000..00041}.tar"; sample counts then come from a manifest in their
directory when there is one). Missing local shards are an error before anything starts.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST_NAME, Manifest
from pipeline.data.remote import ReadPolicy, is_remote


@dataclass
class ShardSet:
    urls: list[str]
    samples: list[int | None]  # per shard; None where no manifest says

    @property
    def total_samples(self) -> int | None:
        return None if any(n is None for n in self.samples) else sum(self.samples)


def _is_remote_directory(part: str) -> bool:
    """s3://bucket/shards or http://host/shards/: a directory with a manifest, not tars (a
    signed URL's query is not part of the name)."""
    return is_remote(part) and not part.startswith("pipe:") and \
        not _name(part).rstrip("/").endswith((".tar", ".tar.gz", "}"))


def _name(url: str) -> str:
    """A URL's path without its query (`.../00001.tar?X-Amz-Signature=...` -> `.../00001.tar`)."""
    return url.split("?", 1)[0]


def resolve_shards(spec: str, key: str = "data.train_shards", policy: ReadPolicy = ReadPolicy()) -> ShardSet:
    if not spec.strip():
        raise FileNotFoundError(f"{key}: no shards given")
    urls, samples = [], []
    for part in spec.split("::"):
        part = part.strip()
        if _is_remote_directory(part) or not is_remote(part) and Path(part).is_dir():
            manifest = Manifest.read(part, policy)
            for shard in manifest.shards:
                urls.append(f"{part.rstrip('/')}/{shard.name}" if is_remote(part) else str(Path(part) / shard.name))
                samples.append(shard.samples)
            continue
        expanded = list(braceexpand.braceexpand(part))
        counts: dict[str, int] = {}
        if expanded and is_remote(part) and not part.startswith("pipe:"):
            # a manifest beside remote tars is optional (signed URLs sign each object: a 403)
            with contextlib.suppress(OSError):
                counts = {s.name: s.samples for s in Manifest.read(_name(expanded[0]).rsplit("/", 1)[0],
                                                                   policy).shards}
        elif expanded and not is_remote(part) and (Path(expanded[0]).parent / MANIFEST_NAME).is_file():
            counts = {s.name: s.samples for s in Manifest.read(Path(expanded[0]).parent).shards}
        for url in expanded:
            if not is_remote(url) and not Path(url).is_file():
                raise FileNotFoundError(f"{key}: shard {url} does not exist")
            urls.append(url)
            samples.append(counts.get(_name(url).rsplit("/", 1)[-1]))
    if not urls:
        raise FileNotFoundError(f"{key}: {spec!r} names no shards")
    return ShardSet(urls, samples)


def assign_shards(shards: ShardSet, epoch: int, seed: int, reader: int, readers: int) -> list[int]:
    """Indices of the shards virtual reader `reader` (of `readers`, data.readers) reads in
    `epoch` when not resampling.

    Every shard goes to exactly one reader, so one epoch reads each sample once. The shard
    order is a seeded permutation per epoch; shards are dealt largest-first to the
    least-loaded reader (by manifest sample counts), so readers get nearly equal numbers of
    samples. Nothing here depends on the world size or the loader workers.
    """
    order = list(range(len(shards.urls)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    if any(n is None for n in shards.samples):
        return order[reader::readers]
    loads = [0] * readers
    owner = {}
    for i in sorted(order, key=lambda i: -shards.samples[i]):  # stable: ties keep the seeded order
        target = min(range(readers), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += shards.samples[i]
    return [i for i in order if owner[i] == reader]


def batches_per_epoch(shards: ShardSet, cfg: DataConfig, global_batch: int, seed: int, epoch: int = 0) -> int:
    """Steps (global batches) per epoch, the same on every rank and every topology.
    Resampled: the epoch size from data.train_num_samples (default: the manifest total).
    Otherwise as many as the least-loaded virtual reader can feed (samples are drawn from
    the readers in turn, one each: pipeline/data/loader.py), its share discounted by the
    tolerated skip rate so that no reader runs dry first. A pure function of the config,
    so that it is checked before launch (pipeline/train/preflight.py)."""
    if cfg.resampled:
        total = cfg.train_num_samples or shards.total_samples
        if not total:
            raise ValueError("data.train_num_samples: needed when the shards have no manifest")
        return max(1, total // global_batch)
    if shards.total_samples is None:
        raise ValueError("data.resampled=false needs a manifest for every shard to size the epoch")
    usable = 1 - cfg.max_skip_rate
    smallest = min(math.floor(sum(shards.samples[i] for i in assign_shards(shards, epoch, seed, r, cfg.readers))
                              * usable) for r in range(cfg.readers))
    return smallest * cfg.readers // global_batch


def check_readers(cfg: DataConfig, world: int, shards: ShardSet | None = None):
    """data.readers against the world size (each rank serves readers r % world == rank) and,
    without resampling, against the shards (a reader without a shard would end the epoch
    at its first turn)."""
    if cfg.readers % world:
        fits = [w for w in range(1, cfg.readers + 1) if cfg.readers % w == 0]
        raise ValueError(f"data.readers={cfg.readers} is not a multiple of the world size {world}: it runs on "
                         f"{', '.join(map(str, fits))} processes; choose a data.readers that every world size "
                         f"you will run divides (it fixes the data order: keep it when resuming)")
    if shards is not None and not cfg.resampled and len(shards.urls) < cfg.readers:
        raise ValueError(f"data.readers={cfg.readers} virtual readers but {len(shards.urls)} shards: without "
                         f"resampling every reader needs a shard; set data.readers to at most {len(shards.urls)} "
                         f"(a multiple of every world size you will run)")


def debiased_sources(cfg: DataConfig, policy: ReadPolicy) -> list[ShardSet]:
    """The sources of `data.sampling: debiased`, each with a manifest (it weighs them)."""
    parts = [p.strip() for p in cfg.train_shards.split("::") if p.strip()]
    if len(parts) < 2:
        raise ValueError("data.sampling: debiased needs two or more sources in data.train_shards (a::b)")
    sources = [resolve_shards(p, policy=policy) for p in parts]
    for part, shards in zip(parts, sources):
        if shards.total_samples is None:
            raise ValueError(f"data.sampling: debiased weighs sources by size: {part} has no manifest")
    return sources
