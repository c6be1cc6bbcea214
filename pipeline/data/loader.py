"""Streaming webdataset loader: shards -> decoded, augmented, tokenized batches.

The data package, by concern: decode.py (one raw sample -> image and caption, or why it
is skipped), samples.py (per-sample views and collation, as the objective's BatchRecipe
asks), this module (readers over the shards, the stream the trainer iterates, its
position and its skip counters), debiased.py (ZeroVL's debiased stream over several
sources, and `make_stream`), shards.py (which reader reads which shard).

Properties the trainer relies on:

* **Topology-free.** The shards belong to `data.readers` virtual readers, not to ranks or
  workers; step s's global batch is the same set of samples, with the same augmentations,
  on any number of processes and loader workers (`DataStream.__iter__` says why).
  Without resampling each shard goes to exactly one reader per epoch (`assign_shards`),
  so an epoch reads every sample once. With resampling each reader draws shards with
  replacement (weighted by their sample counts) from its own seeded stream.
* **Deterministic.** Shard order, the shuffle buffer and every augmentation are seeded
  from (seed, epoch, virtual reader, sample index), so the same seed and epoch give the
  same batches, whatever the process timing.
* **Resumable.** Each batch carries, per virtual reader, how many raw samples it has
  pulled from its shuffled stream. `DataStream.state_dict()` holds these; a resumed
  stream skips exactly that many raw samples per reader before decoding anything, so
  no sample is seen twice or skipped, on the same or another number of processes.
* **Bad data is skipped and counted, never fatal.** Unreadable or truncated tars,
  missing/empty/undecodable images, missing/empty captions: each is counted by reason
  (`SKIP_REASONS`) and the stream goes on. (webdataset's `warn_and_continue` is not
  used: it sleeps half a second per exception.) A skip rate above
  `data.max_skip_rate` stops the run with `DataQualityError`.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.util  # noqa: F401 (its exit function is registered before ours)
import random
import tarfile
import time
import weakref
from collections import Counter, deque

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.decode import SKIP_REASONS, BadSample, shard_samples
from pipeline.data.recipe import BatchRecipe, ImageSpec, StreamSpec
from pipeline.data.remote import ReadPolicy, is_remote, opened, read_policy
from pipeline.data.samples import BatchMaker
from pipeline.data.shards import ShardSet, assign_shards, batches_per_epoch, check_readers, resolve_shards
from pipeline.ranks import world
from pipeline.redact import redact_output

log = logging.getLogger(__name__)

# The skip-rate ceiling is checked once this many samples have been read, so that one
# bad sample among the first few does not stop a run.
MIN_SAMPLES_FOR_SKIP_RATE = 200
class DataQualityError(RuntimeError):
    pass


class Stalled(Exception):
    """A reader got no good sample within data.stall_seconds (raised inside its stream)."""


class _VirtualReader:
    """One virtual reader's samples: its shards (or its seeded resampled draw) -> tar stream ->
    shuffle -> skip what a resumed run already consumed -> decoded samples, counting what is
    lost and why. Its order and draws depend on (seed, epoch, reader) only."""

    DEAD_AFTER_SHARDS = 3  # remote shards failed before their first sample, with no sample at all

    def __init__(self, spec: StreamSpec, reader: int, maker: BatchMaker):
        self.spec, self.reader, self.maker = spec, reader, maker
        state = spec.resume.get(reader, {})
        self.skip = int(state.get("raw", 0))
        self.raw = 0
        self.good = int(state.get("good", 0))
        self.truncated = int(state.get("truncated", 0))  # captions cut at max_caption_bytes
        self.ended = bool(state.get("end", False))
        # (shard url, sample key) -> why the sample is skipped, found while reading its tar
        # members (the sample itself arrives later, from webdataset's grouping)
        self.rejected: dict[tuple[str, str], str] = {}
        self.skipped = Counter(state.get("skipped", {}))
        self.per_url: Counter = Counter()
        self.expected = dict(zip(spec.shards.urls, spec.shards.samples))  # the manifest's count per shard
        self.flagged: set[str] = set()
        self.lost_by_shard: Counter = Counter()  # which shards cost the most, for the messages
        # shards that broke before giving a single sample, with why: once every shard of the
        # list is here and no good sample ever came, nothing can (a dead dataset stops at
        # once instead of after data.stall_seconds)
        self.barren: dict[str, str] = {}
        self.last_good = self.started = time.monotonic()
        self.good_before = self.good  # a resumed reader's earlier good samples
        self.ids = (spec.seed, spec.epoch, reader)
        self.samples = None  # opened at the reader's first turn

    def state(self) -> dict:
        return {"raw": max(self.raw, self.skip), "good": self.good, "truncated": self.truncated,
                "skipped": dict(self.skipped), "end": self.ended}

    def count(self, reason: str, url: str, samples: int = 1):
        if self.raw >= self.skip:  # the skipped prefix was counted before the checkpoint
            self.skipped[reason] += samples
            self.lost_by_shard[url] += samples
        self.check_stall()

    def check_stall(self):
        """Called on every failure (a shard or a sample) and before every shard: a stream
        in which everything fails never blocks, it spins through the shards."""
        urls = self.spec.shards.urls
        if not self.good and len(self.barren) == len(urls) and set(urls) <= self.barren.keys():
            why = "; ".join(f"{url}: {reason}" for url, reason in list(self.barren.items())[:3])
            raise Stalled(f"every one of the {len(urls)} shards failed before its first sample and no good sample "
                          f"has arrived (virtual reader {self.reader}, rank {self.spec.rank}): {why}"
                          f"{'; ...' if len(urls) > 3 else ''}. Check the shard list and the store, e.g. with "
                          f"`python -m data_prep.verify`.")
        # a dead store, by time (issue 44): with thousands of shards the list never runs out
        # before data.stall_seconds; no sample at all since the start, three or more shards
        # failed before their first sample and longer than one shard's read budget gone by
        trying = time.monotonic() - self.started
        if self.good == self.good_before and len(self.barren) >= self.DEAD_AFTER_SHARDS and \
                trying > self.spec.read.budget and any(is_remote(url) for url in self.barren):
            why = "; ".join(f"{url}: {reason}" for url, reason in list(self.barren.items())[:3])
            raise Stalled(f"no shard has given a sample in {trying:.0f} s: the {len(self.barren)} tried all failed "
                          f"before their first sample, longer than one shard's read budget ({self.spec.read.budget:g} "
                          f"s) (virtual reader {self.reader}, rank {self.spec.rank}): {why}. The store looks dead: "
                          f"check it, the credentials and the shard list, e.g. with `python -m data_prep.verify`.")
        waited = time.monotonic() - self.last_good
        if self.spec.stall_seconds and waited > self.spec.stall_seconds:
            reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.most_common()) or "none"
            raise Stalled(f"no good sample in {waited:.0f} s, over data.stall_seconds={self.spec.stall_seconds:g} "
                          f"(virtual reader {self.reader}, rank {self.spec.rank}); skipped: {reasons}; shards "
                          f"that cost the most: {costliest(self.lost_by_shard)}. Check the shards with "
                          f"`python -m data_prep.verify`.")

    def lost_samples(self, url: str) -> int:
        """The samples a shard that broke off loses: what its manifest lists beyond those
        already read (at least 1: a shard without a count still counts). An unreadable
        shard counted as one bad sample let a run with half its data gone pass
        data.max_skip_rate at 2% (issue 22). A shard given without a manifest has no count:
        it loses the one sample that is known to be gone (issue 44: `None - int` in a worker)."""
        expected = self.expected.get(url) or 0
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
        if self.per_url[url] == 0:
            self.barren.setdefault(url, exn.strerror if isinstance(exn, OSError) and exn.strerror else message)
        if url not in self.flagged:
            self.flagged.add(url)
            if isinstance(exn, FileNotFoundError):
                log.warning("shard %s: listed in the manifest but missing %s; skipping it", url,
                            "from the store" if is_remote(url) else "on disk")
            else:
                log.warning("shard %s: %s (%s); skipping the rest of it", url,
                            "truncated" if truncated else "unreadable",
                            exn.strerror if isinstance(exn, OSError) and exn.strerror else message)
            self.count("truncated_shard" if truncated else "unreadable_shard", url, self.lost_samples(url))
        return True  # keep going with the next shard

    def urls(self):
        spec = self.spec
        if spec.data.resampled:
            rng = random.Random(f"resample:{spec.seed}:{spec.epoch}:{self.reader}")
            weights = spec.shards.samples if spec.shards.total_samples else None
            while True:
                self.check_stall()
                yield dict(url=rng.choices(spec.shards.urls, weights=weights)[0])
        else:
            for i in assign_shards(spec.shards, spec.epoch, spec.seed, self.reader, spec.readers):
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
                if self.spec.data.resampled:  # a shard can come round again
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
        data = self.spec.data
        streams = opened(self.urls(), self.spec.read, self.on_tar_error, data.prefetch_shards, data.prefetch_bytes)
        stream = self.checked(shard_samples(streams, self.spec.data.max_member_bytes, self.reject, self.on_tar_error))
        if self.spec.shuffle_buffer > 1:
            rng = random.Random(f"shuffle:{':'.join(map(str, self.ids))}")
            stream = wds.shuffle(self.spec.shuffle_buffer, initial=self.spec.shuffle_buffer // 2, rng=rng)(stream)
        return stream

    def next_sample(self) -> dict | None:
        """This reader's next good sample (decoded, augmented), or None once it has none left."""
        if self.ended:
            return None
        if self.samples is None:
            self.samples = iter(self.raw_samples())
        # the wait starts now: time the consumer spent elsewhere (a long evaluation, a
        # checkpoint, other readers' turns) is not a stall of this reader
        self.last_good = time.monotonic()
        for sample in self.samples:
            self.raw += 1
            rejected = self.rejected.pop((sample["__url__"], sample["__key__"]), None)
            if self.raw <= self.skip:
                self.last_good = time.monotonic()  # a resumed stream's fast-forward is progress
                continue
            try:
                if rejected:
                    raise BadSample(rejected)
                item = self.maker.sample(sample, self.ids, self.raw)
                if self.spec.data.max_caption_bytes and len(sample["txt"]) > self.spec.data.max_caption_bytes:
                    self.truncated += 1  # cut, and used
            except BadSample as bad:
                self.count(bad.reason, sample["__url__"])
                continue
            self.good += 1
            return item
        self.ended = True
        return None


class _Worker:
    """One loader worker: its share of this rank's virtual readers, and for every batch of
    the rank its part of it (the samples at the batch positions `worker_of` gives it), in
    position order. A reader that has run out passes its turn to the worker's next one; a
    worker whose readers have all run out sends what it has and ends."""

    def __init__(self, spec: StreamSpec, worker: int):
        self.spec, self.worker = spec, worker
        maker = BatchMaker(spec)
        # local reader j is global reader rank + world * j (so rank = reader % world)
        self.local = [j for j in range(spec.local_readers) if j % spec.active_workers == worker]
        self.readers = {j: _VirtualReader(spec, spec.rank + spec.world * j, maker) for j in self.local}
        self.maker = maker

    def take(self, j: int) -> dict | None:
        """Local reader j's next sample; if j has run out, the next of this worker's readers
        (in turn after j) that has one."""
        at = self.local.index(j)
        for k in self.local[at:] + self.local[:at]:
            item = self.readers[k].next_sample()
            if item is not None:
                return item
        return None

    def meta(self, end: bool) -> dict:
        lost = sum((r.lost_by_shard for r in self.readers.values()), Counter())
        return {"worker": self.worker, "readers": {r.reader: r.state() for r in self.readers.values()},
                "end": end, "costly": dict(lost.most_common(3))}

    def __iter__(self):
        spec, batch = self.spec, self.spec.batch_size
        n = spec.local_readers
        try:
            if not self.local:  # more workers than readers: nothing to serve
                yield {"meta": self.meta(end=True)}
                return
            u = spec.start_batch
            while True:
                items, end = [], False
                for m in range(u * batch, (u + 1) * batch):
                    if spec.worker_of(m) != self.worker:
                        continue
                    item = self.take(m % n)
                    if item is None:
                        end = True
                        break
                    items.append(item)
                chunk = self.maker.batch(items) if items else {}
                yield {**chunk, "meta": {**self.meta(end), "count": len(items)}}
                if end:
                    return
                u += 1
        except Stalled as stalled:  # the trainer's process raises it (DataStream), with this message
            yield {"meta": {**self.meta(end=True), "count": 0, "stalled": str(stalled)}}


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        info = get_worker_info()
        return iter(_Worker(self.spec, info.id if info else 0))


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
    trainer decides when to stop (pipeline/train/lifecycle.py StopRequest); workers end with it (the
    DataLoader's shutdown, or its watchdog on the parent's death)."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    redact_output()  # a worker started by spawn has fresh streams; its warnings name shard URLs


class DataStream:
    """The trainer's view of the data: epochs of batches, skip counters, and a position
    (`state_dict`) that a resumed run continues from exactly, on any number of processes."""

    def __init__(self, cfg: DataConfig, recipe: BatchRecipe = BatchRecipe(), *, batch_size: int,
                 image: ImageSpec, context_length: int, seed: int = 0, rank: int = 0, world: int = 1,
                 train: bool = True, keep_captions: bool = False, drop_last: bool = True, uint8: bool = False,
                 shards: ShardSet | None = None, read: ReadPolicy | None = None):
        """`shards` and `read`: data.train_shards and its read policy as the trainer's
        preflight resolved them (a stream used alone resolves them here). `uint8`: the
        trainer's data.uint8_batches (it normalizes on its device); a stream used alone
        gives normalized floats."""
        self.cfg = cfg
        policy = read or read_policy(cfg)
        self.shards = shards or resolve_shards(cfg.train_shards, policy=policy)
        # a training stream's epoch is as long as its least-fed reader can make it: every
        # reader needs a shard then (a stream read to its end, drop_last=False, does not)
        check_readers(cfg, world, self.shards if drop_last else None)
        self.base = StreamSpec(data=cfg, shards=self.shards, read=policy, recipe=recipe, image=image,
                               context_length=context_length, batch_size=batch_size, seed=seed, rank=rank,
                               world=world, train=train, keep_captions=keep_captions, drop_last=drop_last,
                               uint8=uint8)
        self.global_batch = batch_size * world
        self.epoch = 0
        self.epoch_step = 0  # batches taken this epoch: the same count on every rank
        # A stream used alone checks data.max_skip_rate on its own counters after every
        # batch; the trainer turns this off and checks the counters of all ranks on log
        # steps (pipeline/train/trainer.py), so that every rank stops together, on the whole picture.
        self.local_skip_check = True
        self.readers: dict[int, dict] = {}  # this epoch's position, per virtual reader of this rank
        self.done = {"good": 0, "truncated": 0, "skipped": Counter()}  # finished epochs
        self.costly: dict[int, dict] = {}  # per worker: the shards that lost the most samples

    # ---- position ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's position. Every field means the same on any topology: readers are
        global ids, steps are global batches; `merge_states` joins every rank's."""
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "readers_total": self.base.readers,
                "global_batch": self.global_batch,
                "readers": {int(r): dict(s) for r, s in self.readers.items()},
                "done": {"good": self.done["good"], "truncated": self.done["truncated"],
                         "skipped": dict(self.done["skipped"])}}

    def load_state_dict(self, state: dict):
        """A position saved by this rank, or {"from_ranks": [every rank's]} from a run on
        another number of processes (this rank takes its own readers' part; rank 0 the
        finished epochs' totals)."""
        if "from_ranks" in state:
            state = self.merge_states(state["from_ranks"])
        if "readers_total" not in state:
            raise ValueError("train.resume: the checkpoint's data position is per (rank, worker): it was written "
                             "before data.readers existed (commit 'virtual readers'); resume it with an earlier "
                             "checkout, or start a new run with model.init_from")
        for key, ours in (("readers_total", self.base.readers), ("global_batch", self.global_batch)):
            if int(state[key]) != ours:
                name = "data.readers" if key == "readers_total" else "train.global_batch_size"
                raise ValueError(f"train.resume: the checkpoint's data order was made with {name}={state[key]}, "
                                 f"this run has {ours}; keep {name} to resume (it fixes which samples make each "
                                 f"step)")
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])
        b = self.base
        self.readers = {int(r): dict(s) for r, s in state["readers"].items() if int(r) % b.world == b.rank}
        done = state["done"]
        if state.get("merged") and b.rank != 0:  # the totals are counted once, on rank 0
            done = {"good": 0, "truncated": 0, "skipped": {}}
        self.done = {"good": int(done["good"]), "truncated": int(done.get("truncated", 0)),
                     "skipped": Counter(done["skipped"])}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Every rank's `state_dict` at one save -> one position for any number of processes."""
        first = states[0]
        skipped = sum((Counter(s["done"]["skipped"]) for s in states), Counter())
        return {**first, "merged": True, "readers": {int(r): v for s in states for r, v in s["readers"].items()},
                "done": {"good": sum(s["done"]["good"] for s in states),
                         "truncated": sum(s["done"].get("truncated", 0) for s in states),
                         "skipped": dict(skipped)}}

    # ---- counters ------------------------------------------------------------------
    def skipped(self) -> Counter:
        total = Counter(self.done["skipped"])
        for s in self.readers.values():
            total.update(s["skipped"])
        return total

    def good(self) -> int:
        return self.done["good"] + sum(s["good"] for s in self.readers.values())

    def truncated(self) -> int:
        """Captions cut at data.max_caption_bytes (the samples were used: not a skip)."""
        return self.done["truncated"] + sum(s.get("truncated", 0) for s in self.readers.values())

    def shard_losses(self) -> Counter:
        """Samples lost per shard on this rank (each worker reports its own top few)."""
        return sum((Counter(c) for c in self.costly.values()), Counter())

    def check_skip_rate(self):
        if self.local_skip_check:
            check_skip_rate(self.good(), self.skipped(), self.cfg.max_skip_rate, self.shard_losses)

    # ---- iteration -----------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.shards, self.cfg, self.global_batch, self.base.seed, self.epoch)

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
                        yield batch
                        if self.epoch_step >= per_epoch:
                            break
                finally:  # the epoch's readers end here, not when the generator is collected
                    epoch.close()
            self.next_epoch()

    def __iter__(self):
        """Batches of the current epoch, from where the stream stands.

        Why the order does not depend on the topology: global sample i of an epoch is the
        next sample of virtual reader i mod R (R = data.readers), and step s is samples
        [sG, (s+1)G) (G = the global batch). Rank k of W takes the samples i = k + W m,
        m = 0, 1, ... (W divides G and R): so its m-th sample comes from reader
        k + W (m mod R/W), one of its own, and what step s holds is the same set for every W.
        Each reader's order and draws are seeded by (seed, epoch, reader) and its position
        is saved per reader, so a run saved on W processes resumes on any W' dividing R.
        Loader workers split a rank's readers (local reader j: worker j mod workers) and
        `_assemble` puts their parts back in m order, so the workers do not change a batch
        either. (Once a non-resampled reader has run out, its turns pass to a sibling on
        the same worker: the epoch's tail past `batches_per_epoch`, or a reader that lost
        more samples than data.max_skip_rate allows, is the one place topology shows.)"""
        b = self.base
        spec = dataclasses.replace(b, epoch=self.epoch, start_batch=self.epoch_step, resume=dict(self.readers))
        num_workers = min(self.cfg.workers, b.local_readers)
        loader = iter(DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                                 worker_init_fn=leave_stop_signals_to_the_trainer if num_workers else None))
        _live_workers.update(getattr(loader, "_workers", ()))
        try:
            yield from self._assemble(loader, spec)
        finally:  # an error, the end, or an abandoned epoch: the workers go now, not at exit
            end_workers(loader)

    def _assemble(self, loader, spec: StreamSpec):
        """Workers' parts -> this rank's batches, in position order. Every worker sends one
        part per batch (maybe empty) until it ends; parts are matched by worker, not by
        arrival (the DataLoader skips a worker that has ended)."""
        queues = {w: deque() for w in range(spec.active_workers)}
        active = list(queues)
        fresh, delivered = not self.readers, 0
        while active:
            parts = {}
            for w in list(active):
                while not queues[w]:
                    item = next(loader, None)
                    if item is None:  # every worker has ended
                        queues[w].append({"meta": {"worker": w, "readers": {}, "end": True, "count": 0}})
                        break
                    queues[item["meta"]["worker"]].append(item)
                part = queues[w].popleft()
                meta = part.pop("meta")
                if "stalled" in meta:
                    raise DataQualityError(meta["stalled"])
                self.readers.update({int(r): s for r, s in meta["readers"].items()})
                self.costly[w] = meta.get("costly", {})
                if meta["end"]:
                    active.remove(w)
                if meta["count"]:
                    parts[w] = part
            batch = join_parts(parts, spec, self.epoch_step)
            count = len(batch["keys"]) if batch else 0
            if count == spec.batch_size or (count and not spec.drop_last):
                self.check_skip_rate()
                self.epoch_step += 1
                delivered += 1
                yield batch
            elif spec.drop_last:  # a worker ran dry: the epoch's full batches are done
                break
        if fresh and not delivered:  # every later epoch would be as empty: 18,114 of them in issue 22
            b = self.base
            reasons = ", ".join(f"{k}={v}" for k, v in self.skipped().most_common()) or "none"
            raise DataQualityError(
                f"epoch {self.epoch} gave rank {b.rank} no batch of {b.batch_size} (its {b.local_readers} virtual "
                f"reader(s) ended first); skipped: {reasons}; shards that cost the most: "
                f"{costliest(self.shard_losses())}. Too few readable samples per rank and "
                f"reader: check the shards with `python -m data_prep.verify`, or use data.resampled: true")

    def next_epoch(self):
        """Close the current epoch (its counters go to the totals) and move on."""
        self.done["good"] = self.good()
        self.done["truncated"] = self.truncated()
        self.done["skipped"] = self.skipped()
        self.readers = {}
        self.epoch_step = 0
        self.epoch += 1


def join_parts(parts: dict[int, dict], spec: StreamSpec, batch_index: int) -> dict:
    """The workers' parts of batch `batch_index` -> one batch, its samples in position
    order (so that the number of workers does not change it). A short batch (a worker ran
    dry) keeps the workers' order."""
    if not parts:
        return {}
    order = sorted(parts)
    first = parts[order[0]]
    if len(order) == 1:
        return first
    start = batch_index * spec.batch_size
    owners = [spec.worker_of(m) for m in range(start, start + spec.batch_size)]
    counts = {w: len(parts[w]["keys"]) for w in order}
    permutation = None
    if all(counts[w] == owners.count(w) for w in order) and set(owners) == set(order):
        offsets, taken, permutation = {}, Counter(), []
        for w in order:
            offsets[w] = sum(counts[v] for v in order if v < w)
        for w in owners:
            permutation.append(offsets[w] + taken[w])
            taken[w] += 1
    joined = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            joined[key] = torch.cat([parts[w][key] for w in order])
            if permutation is not None:
                joined[key] = joined[key][permutation]
        elif isinstance(value, list):
            joined[key] = [x for w in order for x in parts[w][key]]
            if permutation is not None:
                joined[key] = [joined[key][i] for i in permutation]
        else:  # the same for every part (the pixel normalization's name)
            joined[key] = value
    return joined


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
    if world()[1] == 1:
        return good, truncated, skipped
    counts = torch.tensor([good, truncated, *(skipped.get(r, 0) for r in SKIP_REASONS)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(counts)
    total, cut, *by_reason = (int(c) for c in counts.tolist())
    return total, cut, Counter({r: n for r, n in zip(SKIP_REASONS, by_reason) if n})


def shard_losses_over_ranks(local: Counter) -> Counter:
    """Every rank's samples lost per shard, summed (a collective: all ranks call it)."""
    import torch.distributed as dist
    if world()[1] == 1:
        return local
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, dict(local))
    return sum((Counter(g) for g in gathered), Counter())
