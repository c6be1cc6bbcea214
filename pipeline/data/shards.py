"""Shard lists: resolving `data.train_shards`, and which shards a (rank, worker) reads.

A spec is one or more parts joined by "::" (as open_clip does); each part is a shard
directory with a manifest.yaml (data_prep.shard writes it) or a brace pattern of tar
files ("dir/{00000..00041}.tar"; sample counts then come from a manifest in their
directory when there is one). Missing local shards are an error before anything starts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import braceexpand

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


def samples_per_rank(shards: ShardSet, epoch: int, seed: int, world: int, num_workers: int) -> list[int]:
    """Samples each rank reads in `epoch` without resampling (requires manifest counts)."""
    if shards.total_samples is None:
        raise ValueError("per-rank sample counts need a manifest for every shard")
    return [sum(shards.samples[i] for w in range(num_workers)
                for i in assign_shards(shards, epoch, seed, rank, world, w, num_workers)) for rank in range(world)]
