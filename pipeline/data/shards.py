"""Shard lists: resolving `data.train_shards`, and which shards a (rank, worker) reads.

A spec is one or more parts joined by "::" (as open_clip does); each part is a shard
directory with a manifest.yaml (data_prep.shard writes it) or a brace pattern of tar
files ("dir/{00000..00041}.tar"; sample counts then come from a manifest in their
directory when there is one). Missing local shards are an error before anything starts.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from pipeline.config import DataConfig
from pipeline.data.manifest import MANIFEST_NAME, Manifest


@dataclass
class ShardSet:
    urls: list[str]
    samples: list[int | None]  # per shard; None where no manifest says

    @property
    def total_samples(self) -> int | None:
        return None if any(n is None for n in self.samples) else sum(self.samples)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shards(spec: str, key: str = "data.train_shards") -> ShardSet:
    if not spec.strip():
        raise FileNotFoundError(f"{key}: no shards given")
    urls, samples = [], []
    for part in spec.split("::"):
        part = part.strip()
        if not _is_remote(part) and Path(part).is_dir():
            manifest = Manifest.read(part)
            for shard in manifest.shards:
                urls.append(str(Path(part) / shard.name))
                samples.append(shard.samples)
            continue
        expanded = list(braceexpand.braceexpand(part))
        counts: dict[str, int] = {}
        parent = Path(expanded[0]).parent if expanded else Path(".")
        if not _is_remote(part) and (parent / MANIFEST_NAME).is_file():
            counts = {s.name: s.samples for s in Manifest.read(parent).shards}
        for url in expanded:
            if not _is_remote(url) and not Path(url).is_file():
                raise FileNotFoundError(f"{key}: shard {url} does not exist")
            urls.append(url)
            samples.append(counts.get(Path(url).name))
    if not urls:
        raise FileNotFoundError(f"{key}: {spec!r} names no shards")
    return ShardSet(urls, samples)


def assign_shards(shards: ShardSet, epoch: int, seed: int, rank: int, world: int, worker: int,
                  num_workers: int) -> list[int]:
    """Indices of the shards global worker (rank, worker) reads in `epoch` when not resampling.

    Every shard goes to exactly one of the world x num_workers readers, so one epoch reads
    each sample once. The shard order is a seeded permutation per epoch; shards are
    dealt largest-first to the least-loaded reader (by manifest sample counts), so
    ranks get nearly equal numbers of samples.
    """
    order = list(range(len(shards.urls)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    readers = world * num_workers
    me = rank * num_workers + worker
    if any(n is None for n in shards.samples):
        return order[me::readers]
    loads = [0] * readers
    owner = {}
    for i in sorted(order, key=lambda i: -shards.samples[i]):  # stable: ties keep the seeded order
        target = min(range(readers), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += shards.samples[i]
    return [i for i in order if owner[i] == me]


def batches_per_epoch(shards: ShardSet, cfg: DataConfig, batch_size: int, world: int, seed: int, epoch: int = 0) -> int:
    """Batches every rank can deliver per epoch. Resampled: the epoch size from
    data.train_num_samples (default: the manifest total). Otherwise the smallest rank's
    share, discounted by the tolerated skip rate so that no rank runs dry first. A pure
    function of the config, so that it is checked before launch (pipeline/preflight.py)."""
    if cfg.resampled:
        total = cfg.train_num_samples or shards.total_samples
        if not total:
            raise ValueError("data.train_num_samples: needed when the shards have no manifest")
        return max(1, total // (batch_size * world))
    if shards.total_samples is None:
        raise ValueError("data.resampled=false needs a manifest for every shard to size the epoch")
    workers = max(1, cfg.workers)
    per_worker = [[sum(shards.samples[i] for i in assign_shards(shards, epoch, seed, r, world, w, workers))
                   for w in range(workers)] for r in range(world)]
    usable = 1 - cfg.max_skip_rate
    return min(sum(math.floor(n * usable / batch_size) for n in rank) for rank in per_worker)


def debiased_sources(cfg: DataConfig) -> list[ShardSet]:
    """The sources of `data.sampling: debiased`, each with a manifest (it weighs them)."""
    parts = [p.strip() for p in cfg.train_shards.split("::") if p.strip()]
    if len(parts) < 2:
        raise ValueError("data.sampling: debiased needs two or more sources in data.train_shards (a::b)")
    sources = [resolve_shards(p) for p in parts]
    for part, shards in zip(parts, sources):
        if shards.total_samples is None:
            raise ValueError(f"data.sampling: debiased weighs sources by size: {part} has no manifest")
    return sources
