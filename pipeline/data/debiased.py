"""ZeroVL's debiased sampling (Cui et al., ECCV 2022, sec. 3.2; zerovl/ZeroVL
zerovl/tasks/clip/clip_runner.py `debias_train`): each step's whole global batch comes from
one source, chosen in proportion to its size, the same on every rank without
communicating. `make_stream` gives the trainer the stream `data.sampling` names.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.loader import DataStream
from pipeline.data.recipe import BatchRecipe
from pipeline.data.remote import ReadPolicy, read_policy
from pipeline.data.shards import ShardSet, debiased_sources


def choose_source(seed: int, step: int, sizes: list[int]) -> int:
    """ZeroVL's debiased sampling: the source of step `step`'s whole global batch, with
    probability proportional to its size. A pure function of (seed, step), so every rank
    draws the same source without communicating (ZeroVL's DGA runner uses a shared
    default_rng(2021) for the same reason)."""
    weights = np.asarray(sizes, dtype=np.float64)
    return int(np.random.default_rng([seed, step]).choice(len(sizes), p=weights / weights.sum()))


def make_stream(cfg: DataConfig, recipe: BatchRecipe, sources: list[ShardSet], read: ReadPolicy,
                **kwargs) -> "DataStream | DebiasedStream":
    """The trainer's stream for data.sampling, over the shard sets and with the read policy
    its preflight resolved (pipeline/train/preflight.py: one set, or one per debiased source)."""
    if cfg.sampling == "debiased":
        return DebiasedStream(cfg, recipe, sources=sources, read=read, **kwargs)
    return DataStream(cfg, recipe, shards=sources[0], read=read, **kwargs)


class DebiasedStream:
    """`data.sampling: debiased`: one DataStream per "::"-separated source of
    data.train_shards; each step takes its batch from the source `choose_source` names, so
    the global batch never mixes sources. A source that runs out starts its next epoch;
    a trainer's "epoch" is the sum of the sources' epochs in batches. Same interface as
    DataStream (iteration, position, counters)."""

    def __init__(self, cfg: DataConfig, recipe: BatchRecipe = BatchRecipe(), *, seed: int = 0,
                 sources: list[ShardSet] | None = None, read: ReadPolicy | None = None, **stream_kwargs):
        self.cfg, self.seed = cfg, seed
        read = read or read_policy(cfg)
        sources = sources or debiased_sources(cfg, read)
        self.sources = [DataStream(cfg, recipe, seed=seed, shards=shards, read=read, **stream_kwargs)
                        for shards in sources]
        self.sizes = [shards.total_samples for shards in sources]
        self.step = 0

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.sources)

    def state_dict(self) -> dict:
        return {"step": self.step, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict):
        if "from_ranks" in state:  # saved on another number of processes: each source's, joined
            ranks = state["from_ranks"]
            state = {"step": ranks[0]["step"],
                     "sources": [DataStream.merge_states([r["sources"][i] for r in ranks])
                                 for i in range(len(self.sources))]}
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
