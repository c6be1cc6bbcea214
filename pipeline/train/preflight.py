"""The checks a run passes before anything heavy is imported: the run config, the
DeepSpeed JSON and the batch arithmetic, the shards and whether a rank's share fills a
batch, the output folder, `train.resume`, the objective's accumulation rule and the
eval dataset's folder. Plain Python: no torch, DeepSpeed or MLflow is imported, so a bad
config fails in a fraction of a second (tests/test_validate.py checks the imports). What needs
them (DeepSpeed's own models of its JSON, `model.init_from`'s weights: `pipeline.train.trainer.
prepare`; the eval set's contents: the evaluator launch/train.py builds) is checked next, still
before any process group. What is resolved here (the shards, the read policy, the resume
point, the world size, the accumulation) is the run's `Plan`, handed to the trainer.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, features_only, load_config
from pipeline.data.remote import ReadPolicy, env_references, is_remote, read_policy
from pipeline.data.shards import ShardSet, batches_per_epoch, check_readers, debiased_sources, resolve_shards
from pipeline.train.ds_config import fill_ds_config, read_ds_config
from pipeline.weights import files as checkpoint_files


@dataclass
class Plan:
    """A validated run, as preflight resolved it: the trainer takes these values from here
    and resolves none of them again."""
    cfg: RunConfig
    ds_config: dict  # DeepSpeed's JSON filled from the run config (batch sizes, optimizer)
    world: int  # processes the launcher started (WORLD_SIZE)
    accum: int  # micro-batches per step and rank (global = micro x accum x world)
    read: ReadPolicy  # timeouts and retries of every remote read (data.read_*)
    sources: list[ShardSet]  # data.train_shards resolved: one set, or one per debiased source
    # train.resume as found before launch: (checkpoints folder, tag, its COMPLETE record);
    # rank 0 verifies the files' checksums once the process group exists (the trainer)
    resume: tuple[Path, str, dict] | None = None
    # train.micro_batch_size=auto: cfg holds the rank's whole share until the trainer has
    # probed the GPU for the largest micro batch that fits (pipeline/train/auto_batch.py)
    probe_micro_batch: bool = False


def check_run(config: str | None, overrides: list[str], deepspeed_config: str) -> Plan:
    """The run's plan, or a ConfigError / FileNotFoundError / ValueError naming the key or
    file."""
    cfg = with_rendezvous_run_name(load_config(config, overrides))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, probe_micro_batch = auto_micro_batch_ceiling(cfg, world)
    ds_config = fill_ds_config(read_ds_config(deepspeed_config), cfg.train, cfg.optim, world)
    accum = ds_config["gradient_accumulation_steps"]
    check_env_references(cfg)
    read = read_policy(cfg.data)
    sources = shard_sources(cfg, world, read)
    check_stall_budget(cfg, read, sources)
    check_output_dir(Path(cfg.train.output_dir))
    if cfg.train.resume in ("latest", "auto") and not cfg.train.run_name:
        raise ConfigError(f"train.resume={cfg.train.resume} needs train.run_name (which run to resume; under "
                          f"torchrun it defaults to the rendezvous id, --rdzv-id)")
    resume = None
    if cfg.train.resume:  # a path that is no checkpoint, or one this run cannot continue
        found = checkpoint_files.resolve_resume(cfg.train.resume,
                                                Path(cfg.train.output_dir) / cfg.train.run_name / "checkpoints")
        if found:
            resume = (*found, checkpoint_files.check_resumable(*found, world, zero_stage(ds_config), cfg))
    if not features_only(cfg.objective) and accum > 1:
        raise ConfigError(f"objective.weights: {', '.join(cfg.objective.weights)} (with its views) use more than one "
                          f"view's pooled features, so they cannot run exact accumulation: set "
                          f"train.global_batch_size = micro_batch_size x world size")
    if cfg.train.unmasked_steps and not cfg.model.token_drop:
        raise ConfigError(f"train.unmasked_steps: {cfg.train.unmasked_steps} unmasked steps, but model.token_drop is 0 "
                          f"(nothing is masked before them)")
    if cfg.eval.every_steps and cfg.eval.dataset and not is_remote(cfg.eval.dataset) and not Path(cfg.eval.dataset).is_dir():
        raise ConfigError(f"eval.dataset: {cfg.eval.dataset}: no such dataset directory")
    warn_short_run(cfg)
    return Plan(cfg, ds_config, world, accum, read, sources, resume, probe_micro_batch)


def auto_micro_batch_ceiling(cfg: RunConfig, world: int) -> tuple[RunConfig, bool]:
    """train.micro_batch_size=auto needs a GPU to probe; until the trainer probes it, the run
    holds the rank's whole share of the global batch (no accumulation), the probe's ceiling.
    Returns (the config, whether to probe)."""
    train = cfg.train
    if train.micro_batch_size != "auto":
        return cfg, False
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("train.micro_batch_size=auto: finding the largest micro batch that fits is a probe on a "
                          "CUDA GPU, and this machine has none: give a number (e.g. train.micro_batch_size=32)")
    if train.global_batch_size % world:
        raise ConfigError(f"train.global_batch_size: {train.global_batch_size} is not a multiple of the world size "
                          f"{world} (train.micro_batch_size=auto divides it between the ranks)")
    return dataclasses.replace(cfg, train=dataclasses.replace(train, micro_batch_size=train.global_batch_size // world)), True


def check_stall_budget(cfg: RunConfig, read: ReadPolicy, sources: list[ShardSet]):
    """A reader stalls after data.stall_seconds without a good sample; one remote shard may
    hold it for its whole read budget before the loader gives the shard up and reads on. A
    stall limit under that budget would stop the run for one stuck shard (issue 44)."""
    if any(is_remote(url) for shards in sources for url in shards.urls) and cfg.data.stall_seconds < read.budget:
        raise ConfigError(f"data.stall_seconds: {cfg.data.stall_seconds:g} s is shorter than one remote shard's read "
                          f"budget, {read.budget:g} s (data.read_timeout_seconds x (data.read_retries + 1) and the "
                          f"backoffs): one stuck shard would stop the run instead of being skipped; raise "
                          f"data.stall_seconds or lower the read settings")


def with_rendezvous_run_name(cfg: RunConfig) -> RunConfig:
    """Under torchrun, train.run_name defaults to the rendezvous id (--rdzv-id; torchrun's
    TORCHELASTIC_RUN_ID): the same on every node and at every restart of the job, so a
    restarted group finds its checkpoints with train.resume=auto and nothing more."""
    rendezvous = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if cfg.train.run_name or not rendezvous or rendezvous == "none":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_name=rendezvous))


def check_env_references(cfg: RunConfig):
    """Every ${env:NAME} a shard spec or an http header references is set here (each rank
    reads it at each request: a missing one would fail every shard)."""
    values = {"data.train_shards": cfg.data.train_shards,
              **{f"data.http_headers.{name}": value for name, value in cfg.data.http_headers.items()}}
    for key, value in values.items():
        missing = [name for name in env_references(value) if name not in os.environ]
        if missing:
            raise ConfigError(f"{key}: ${{env:{missing[0]}}} is not set in the environment")


def warn_short_run(cfg: RunConfig):
    """A warmup longer than the run is said, not refused: every short smoke run of a real
    recipe (`train.steps=20` on a 13k-step warmup, `demo.sh --steps 12`) has one, and
    refusing them would make each such run restate the schedule."""
    warmup, steps = cfg.optim.warmup_steps, cfg.train.steps
    if warmup > steps and os.environ.get("RANK", "0") == "0":
        print(f"[train] warning: optim.warmup_steps={warmup} is longer than the run (train.steps={steps}): the "
              f"learning rate peaks at {steps / warmup:.2g} x optim.lr", file=sys.stderr, flush=True)


def check_output_dir(output_dir: Path):
    """A test write: an unwritable train.output_dir was a traceback on every rank after
    the process group started (issue 22)."""
    problem = checkpoint_files.not_writable(output_dir)
    if problem:
        raise ConfigError(f"train.output_dir: {problem}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def shard_sources(cfg: RunConfig, world: int, read: ReadPolicy) -> list[ShardSet]:
    """data.train_shards resolved (the debiased sources with their manifests), checked: the
    shards exist, data.readers suits the world size, and without resampling a global batch
    can be filled. Without resampling an epoch lasts as long as the least-fed virtual
    reader: a global batch larger than the readers can fill together is never filled (it
    passed validation and hung: issue 22)."""
    sources = (debiased_sources(cfg.data, read) if cfg.data.sampling == "debiased"
               else [resolve_shards(cfg.data.train_shards, policy=read)])
    for shards in sources:
        try:
            check_readers(cfg.data, world, shards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.data.resampled:
        return sources
    for shards in sources:
        if batches_per_epoch(shards, cfg.data, cfg.train.global_batch_size, cfg.train.seed) == 0:
            raise ConfigError(
                f"train.global_batch_size: a global batch of {cfg.train.global_batch_size} cannot be filled from "
                f"{shards.urls[0]} ... ({len(shards.urls)} shards, {shards.total_samples} samples) with data."
                f"resampled=false, {cfg.data.readers} virtual readers (data.readers) and data.max_skip_rate="
                f"{cfg.data.max_skip_rate:g} held back: use fewer readers or a smaller batch, or "
                f"data.resampled: true")
    return sources
