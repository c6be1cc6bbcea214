"""The trainer: builds the model and the DeepSpeed engine for a validated run, resumes it,
runs the loop (step, log, evaluate, save) and exports the result. launch/train.py is the
entry point: it validates the run with pipeline/train/preflight.py (no torch: a `Plan`),
calls `prepare` (the checks that need torch or DeepSpeed, still before any process group),
builds the evaluation during training (eval/during_training.py: the library never
imports eval) and calls `run`.

The run's state lives in one object, `Trainer` (torchtitan's Trainer): the plan, the
engine and its objective, the stream, the train state, the logger and the run folder are
its attributes, and the loop and what it calls (logging, non-finite steps, saves,
preemption) read them there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch

from pipeline import ranks
from pipeline.config import RunConfig, features_only, flatten, save_config, to_dict
from pipeline.data.debiased import make_stream
from pipeline.data.loader import DataQualityError, check_skip_rate, shard_losses_over_ranks, summed_over_ranks
from pipeline.data.recipe import ImageSpec
from pipeline.data.remote import is_remote
from pipeline.model.compile import compile_regions
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.redact import redact
from pipeline.tracking.logger import MetricsLogger
from pipeline.tracking.store import store_key
from pipeline.train.auto_batch import probe_micro_batch
from pipeline.train.ds_config import check_against_deepspeed, fill_ds_config
from pipeline.train.engine import (arch_list_deepspeed_can_parse, clamp_logit_scale, full_fp32, lr_factor,
                                   param_groups, topology_free_grad_norm, train_step)
from pipeline.train.lifecycle import Heartbeat, Preempted, StopRequest, collective_timeout, stop_with_launcher
from pipeline.train.mfu import peak_tflops
from pipeline.train.preflight import Plan
from pipeline.weights import checkpoint
from pipeline.weights.export import export
from pipeline.weights.files import check_resumable, needs_universal, resolve_resume, resume_facts, save_blocker


class Evaluator(Protocol):
    """Evaluation during training as the trainer sees it (eval/during_training.py
    `PeriodicZeroShot` is one): whether a step is due, and the metrics of the engine's
    model. Every rank calls it at the same steps."""

    def due(self, step: int) -> bool: ...

    def __call__(self, engine) -> dict[str, float]: ...


def prepare(plan: Plan, deepspeed_config: str) -> tuple | None:
    """The checks that need torch or DeepSpeed, before any process group: the DeepSpeed
    JSON against DeepSpeed's own models, and model.init_from's weights, read here so that a
    bad file fails before launch. Returns model.init_from's (weights, key report) or None."""
    check_against_deepspeed(plan.ds_config, deepspeed_config)
    model = plan.cfg.model
    if not model.init_from:
        return None
    from pipeline.weights.interop import initial_weights
    return initial_weights(model.init_from, model.init_from_format, model.init_from_source, model.arch())


def run(plan: Plan, evaluator: Evaluator | None = None, initial: tuple | None = None) -> int:
    """Train a validated run on this process's rank: build the model and the engine,
    resume, train, export. Returns the exit status."""
    import torch.distributed as dist

    cfg = plan.cfg
    stop = StopRequest()  # SIGTERM/SIGINT from here on: stop at a step boundary with a checkpoint
    stop_with_launcher(stop)
    ranks.init_process_group(collective_timeout(cfg.train.timeout_minutes))
    rank = dist.get_rank()
    if dist.get_world_size() != plan.world:  # the batch arithmetic was checked for plan.world
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE said {plan.world}")
    release_shm_workspace()
    module, counts, flops_per_sample = build_module(cfg, initial)
    if plan.probe_micro_batch:
        try:
            plan = probed_micro_batch(plan, module, rank)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        cfg = plan.cfg
    run_name = broadcast_str(cfg.train.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = prepare_run_dir(cfg, plan.ds_config, module, run_name, rank)
    try:
        resume = agreed_resume(plan, run_dir / "checkpoints", rank)
        engine = start_engine(plan, module, resume, rank)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    data = open_stream(plan, module, rank)
    try:
        state = restore(engine, data, resume)
    except (checkpoint.UntrustedCheckpointError, ValueError) as e:
        print(f"error: {'train.resume: ' if isinstance(e, checkpoint.UntrustedCheckpointError) else ''}{e}",
              file=sys.stderr, flush=True)
        return 2
    logger = open_logger(plan, run_dir, run_name, state, rank)
    announce(plan, logger, run_dir, state, resume, initial, counts, module, rank)
    trainer = Trainer(plan, engine, data, state, logger, run_dir, flops_per_sample, evaluator, stop)
    status = "FAILED"
    try:
        trainer.train()
        status = "FINISHED"
    except (FloatingPointError, DataQualityError, checkpoint.CheckpointSaveError) as e:  # one line each
        sys.stderr.write(f"error: {e}\n")  # one write: print's two would interleave with the other ranks'
        sys.stderr.flush()
        return 1
    except Preempted as e:  # checkpoint saved: a requeued job resumes with train.resume=latest
        status = "KILLED"
        logger.set_tags({"preempted": str(e)})
        print(f"[train] {e.reason}: stopped at step {e.step}, checkpoint saved; resume with train.resume=latest",
              flush=True)
        # Under torchrun a 0 would tell the agent the job is done: ranks whose peer node's
        # agent died stopped cleanly at step 5 of 24 and the job "succeeded" (issue 34).
        # EX_TEMPFAIL makes the agent restart the group (on whatever nodes are left); an
        # agent that is itself being stopped does not restart anything.
        return 75 if "TORCHELASTIC_RUN_ID" in os.environ else 0
    except Exception as e:
        if not peer_failure(e):
            raise
        # the rank that failed said why in its own line; this one says only that it was left
        sys.stderr.write(f"error: rank {rank}: a collective at step {state.step} failed because a peer rank ended or "
                         f"cannot be reached ({str(e).strip().splitlines()[0][:160]}); the peer's own line says why\n")
        sys.stderr.flush()
        return 1
    finally:
        logger.close(status)
    if rank == 0:
        exported = export(run_dir / "checkpoints", run_dir / "model.pt", mlflow_run_id=logger.run_id)
        print(f"[train] done: {state.step} steps; weights for eval: {exported}", flush=True)
        if cfg.tracking.log_model:
            logger.log_model(exported)
    return 0


# ---- setting a run up ---------------------------------------------------------------------

def build_module(cfg: RunConfig, initial: tuple | None) -> tuple[TrainModule, dict, float]:
    """The encoder and its objective, on every rank from the same seed (DeepSpeed also
    broadcasts rank 0's): (the trainer's module, parameter counts, training FLOPs per sample)."""
    from pipeline.model import build_model
    from pipeline.model.flops import train_flops_per_sample
    torch.manual_seed(cfg.train.seed)
    model = build_model(objective_arch(cfg.model.arch(), cfg.objective))  # MLM adds a mask token
    if initial:
        start_from(model, initial[0])
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    if cfg.model.channels_last:
        model.use_channels_last()
    # counted on the dropped model: the MFU logged in train.unmasked_steps' phase under-counts
    flops_per_sample = train_flops_per_sample(model.arch, token_drop=cfg.model.token_drop)
    counts = model.parameter_counts()  # before ZeRO-3 partitions the parameters
    objective = ComposedObjective(cfg.objective, model.arch)  # its heads train and save with the encoder
    counts["objective_heads"] = sum(p.numel() for p in objective.parameters())
    return TrainModule(model, objective), counts, flops_per_sample


def probed_micro_batch(plan: Plan, module: TrainModule, rank: int) -> Plan:
    """train.micro_batch_size=auto: each rank probes its GPU with one real batch of its whole
    share (pipeline/train/auto_batch.py); the group takes the smallest micro batch, and
    activation checkpointing if any rank needed it. The plan as if the numbers had been given."""
    import torch.distributed as dist
    cfg, device = plan.cfg, torch.device("cuda", torch.cuda.current_device())
    batch = next(iter(open_stream(plan, module, rank)))
    try:
        micro, checkpointing, said = probe_micro_batch(module, batch, plan.ds_config, plan.world,
                                                       cfg.train.micro_batch_size, features_only(cfg.objective), device)
    except ValueError as e:  # every rank must reach the reduction, or the others wait in it
        micro, checkpointing, said = 0, False, str(e)
    mine = micro
    agreed = torch.tensor([micro, -int(checkpointing)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    micro, checkpointing = int(agreed[0]), bool(agreed[1])
    if micro == 0:
        raise ValueError(said if mine == 0 else "train.micro_batch_size=auto: another rank's GPU fits no micro batch")
    if rank == 0:
        print(f"[train] {said}" + (f"; the group takes {micro}, its smallest" if micro != mine else ""), flush=True)
    module.encoder.set_grad_checkpointing(checkpointing or cfg.model.grad_checkpointing)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro),
                              model=dataclasses.replace(cfg.model, grad_checkpointing=checkpointing or
                                                        cfg.model.grad_checkpointing))
    ds_config = fill_ds_config(plan.ds_config, cfg.train, cfg.optim, plan.world)
    return dataclasses.replace(plan, cfg=cfg, ds_config=ds_config, accum=ds_config["gradient_accumulation_steps"],
                               probe_micro_batch=False)


def start_from(model, state_dict: dict):
    """Load model.init_from's weights before DeepSpeed starts (it broadcasts rank 0's).
    DeCLIP's MLM adds a mask-token row the file does not have: it keeps its init."""
    own = model.state_dict()
    key = "text.token_embedding.weight"
    if key in state_dict and own[key].shape[0] > state_dict[key].shape[0]:
        state_dict = {**state_dict, key: torch.cat([state_dict[key], own[key][state_dict[key].shape[0]:]])}
    model.load_state_dict(state_dict)


def prepare_run_dir(cfg: RunConfig, ds_config: dict, module: TrainModule, run_name: str, rank: int) -> Path:
    """The run folder; model.json says what an export of its checkpoints is
    (pipeline/weights/export.py reads it): the encoder's architecture, which similarity the
    objective trained, and which objective heads evaluation keeps."""
    run_dir = Path(cfg.train.output_dir) / run_name
    if rank == 0:
        # Owner-only whatever the umask (issue 44): the folder holds the run's configs, its
        # JSONL and checkpoints; under a umask of 000 they were open to every user of a
        # shared filesystem. What lies inside is reached through these folders only.
        for folder in (run_dir, run_dir / "checkpoints"):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        save_config(cfg, run_dir / "config.yaml")
        # what goes out (the run folder, then MLflow's artifacts) goes without credentials
        (run_dir / "ds_config.json").write_text(json.dumps(redact(ds_config), indent=2))
        (run_dir / "model.json").write_text(json.dumps({
            "model_name": cfg.model.name, "arch": to_dict(module.encoder.arch), "config": redact(to_dict(cfg)),
            "similarity": module.similarity, "export_heads": module.export_heads()}, indent=2))
    return run_dir


def agreed_resume(plan: Plan, ckpt_dir: Path, rank: int) -> tuple[Path, str, dict] | None:
    """The checkpoint every rank loads: the one preflight found, once rank 0 has verified
    its checksums (train.resume=latest falls back past a damaged one, which is then checked
    as preflight checked the first); every rank hears rank 0's choice. Returns (folder, tag,
    its COMPLETE record) or None."""
    chosen = ""
    if rank == 0:
        try:
            found = resolve_resume(plan.cfg.train.resume, ckpt_dir, verify=True)
            chosen = str(found[0] / found[1]) if found else ""
        except FileNotFoundError as e:  # every rank must hear it, or they wait in the broadcast
            chosen = f"error: {e}"
    chosen = broadcast_str(chosen)
    if chosen.startswith("error: "):
        raise FileNotFoundError(chosen[len("error: "):])
    if not chosen:
        return None
    folder, tag = Path(chosen).parent, Path(chosen).name
    if plan.resume and (plan.resume[0].resolve(), plan.resume[1]) == (folder.resolve(), tag):
        return plan.resume
    # a fallback, or a checkpoint a restarted group's peer saved after this process's preflight
    return folder, tag, check_resumable(folder, tag, plan.world, zero_stage(plan.ds_config), plan.cfg)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def start_engine(plan: Plan, module: TrainModule, resume: tuple | None, rank: int):
    """DeepSpeed's engine over the module, with the config a resume needs."""
    import deepspeed
    ds_config = resume_config(plan, *resume, rank) if resume else plan.ds_config
    arch_list_deepspeed_can_parse()
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, plan.cfg.optim),
                                      config=ds_config)
    topology_free_grad_norm(engine)
    if plan.cfg.model.compile:  # each region compiles on its first call: the first step reports the time
        compiled = compile_regions(engine.module.encoder)
        if rank == 0:
            print(f"[train] model.compile: {len(compiled)} regions (the transformer blocks, the conv stem, the "
                  f"branch stages, the adapters) compile on the first step; the rest runs eager", flush=True)
    return engine


def resume_config(plan: Plan, ckpt_dir: Path, tag: str, written: dict, rank: int) -> dict:
    """The DeepSpeed config to resume `tag` with: as it is, or, when the checkpoint comes
    from another world size or ZeRO stage, reading DeepSpeed's universal form of it (rank 0
    converts it once; every rank waits for it)."""
    ds_config, world, stage = plan.ds_config, plan.world, zero_stage(plan.ds_config)
    if not needs_universal(written, world, stage):
        return ds_config
    failed = ""
    if rank == 0:
        print(f"[train] {ckpt_dir / tag} was written by {written['world_size']} ranks (ZeRO stage "
              f"{written['facts']['zero_optimization.stage']}); this run has {world} (stage {stage}): loading it "
              f"through DeepSpeed's universal checkpoint", flush=True)
        try:
            checkpoint.to_universal(ckpt_dir, tag)
        except Exception as e:  # noqa: BLE001 (every rank must hear it, or they wait in the broadcast)
            failed = f"train.resume: converting {ckpt_dir / tag} to a universal checkpoint failed: {e}"
    failed = broadcast_str(failed)
    if failed:
        raise ValueError(failed.splitlines()[0])
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def open_stream(plan: Plan, module: TrainModule, rank: int):
    """This rank's stream over the shards preflight resolved, as the objective's recipe asks."""
    cfg, arch = plan.cfg, module.encoder.arch
    recipe = dataclasses.replace(module.objective.recipe(), token_drop=cfg.model.token_drop,
                                 image_tokens=arch.grid_size ** 2)  # the loader draws the kept tokens
    data = make_stream(cfg.data, recipe, plan.sources, plan.read, batch_size=cfg.train.micro_batch_size * plan.accum,
                       image=ImageSpec(arch.image_size, cfg.data.normalization or arch.normalization),
                       context_length=arch.context_length, seed=cfg.train.seed, rank=rank, world=plan.world,
                       uint8=cfg.data.uint8_batches)
    data.local_skip_check = False  # data.max_skip_rate is checked on the sums of all ranks (log_window)
    return data


def restore(engine, data, resume: tuple | None) -> checkpoint.TrainState:
    """The train state to start from: a fresh one, or the checkpoint's, with the engine,
    the data position and the RNGs restored."""
    if not resume:
        return checkpoint.TrainState()
    state = checkpoint.load(engine, resume[0], resume[1])
    data.load_state_dict(state.data)
    checkpoint.restore_rng(state.rng)
    return state


def open_logger(plan: Plan, run_dir: Path, run_name: str, state, rank: int) -> MetricsLogger:
    cfg = plan.cfg
    logger = MetricsLogger(run_dir, cfg.tracking, cfg.train.output_dir, run_name, enabled=rank == 0,
                           run_id=state.mlflow_run_id,
                           tags={"model": cfg.model.name, "objective": "+".join(cfg.objective.weights),
                                 "world_size": plan.world, "dataset": cfg.data.train_shards,
                                 **({"mlflow.parentRunId": cfg.tracking.parent_run_id}
                                    if cfg.tracking.parent_run_id else {})})
    state.mlflow_run_id = logger.run_id
    return logger


def announce(plan: Plan, logger: MetricsLogger, run_dir: Path, state, resume, initial, counts: dict, module, rank: int):
    """What a start says, and what it records once: a restart's count, the resolved config,
    and (on a fresh start) the params and the run folder's files."""
    cfg, world = plan.cfg, plan.world
    # every start of this run folder after the first is a restart, whoever restarted it
    # (torchrun's agent, a SLURM requeue, a person): torchrun's own count misses the
    # restarts a node leaving or joining causes, and each agent counts its own
    restarts = logger.starts_before if rank == 0 else 0
    if restarts:
        print(f"[train] restart {restarts}: {world} ranks, "
              f"{'resuming at step %d' % state.step if resume else 'no checkpoint yet: from step 0'}", flush=True)
        logger.event("restart", restarts=restarts, world_size=world, step=state.step,
                     torchelastic_restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        logger.set_tags({"restarts": restarts})
    if rank != 0:
        return
    print(f"[train] run {run_dir} ({'resumed at step %d' % state.step if resume else 'fresh'})\n"
          f"[train] mlflow store: {store_key(logger.uri)} (tracking.mode={cfg.tracking.mode})\n"
          f"[train] resolved config:\n{json.dumps(redact(to_dict(cfg)), indent=1)}", flush=True)
    if initial:
        print(f"[train] model.init_from {cfg.model.init_from}: {initial[1]}", flush=True)
        if not resume:
            from pipeline.weights.files import file_sha256
            logger.set_tags({"init_from_keys": initial[1], "init_from_sha256": file_sha256(cfg.model.init_from)})
    if not resume:
        logger.log_params(run_params(plan, module.encoder.arch, counts))
        for name in ("config.yaml", "ds_config.json", "model.json"):
            logger.log_artifact(run_dir / name)


def run_params(plan: Plan, arch, counts: dict) -> dict:
    """What MLflow compares runs on: the resolved config, the architecture, the DeepSpeed
    config, and the derived sizes."""
    return {**flatten(to_dict(plan.cfg)), **flatten({"arch": to_dict(arch)}), **flatten({"ds": plan.ds_config}),
            "world_size": plan.world, "accumulation_steps": plan.accum, "params_total": counts["total"],
            "params_shared": counts["shared"], "shared_fraction": round(counts["shared"] / counts["total"], 4),
            "params_objective_heads": counts["objective_heads"]}


def peer_failure(error: BaseException) -> bool:
    """A collective that failed because a peer rank ended (its sockets closed) or cannot be
    reached: torch's distributed errors, and gloo's and NCCL's own RuntimeErrors. Such a
    rank ends in one line, not the backend's traceback under the failed rank's line (issue 44)."""
    import torch.distributed as dist
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "NCCL"))


def release_shm_workspace():
    """DeepSpeed's CPU shared-memory all-reduce (0.19.8, ops/csrc/cpu/comm/shm.cpp) creates
    a 66 MB /dev/shm segment per local rank and never unlinks it: every CPU run leaked
    ~132 MB of RAM until reboot (15 GB after a day of test runs here). All ranks map every
    segment during init_distributed, so once all have passed a barrier each can unlink its
    own name: the mappings stay valid and nothing outlives the processes, even a crash."""
    import torch.distributed as dist
    # shm.cpp's name: prefix, uid, MASTER_ADDR, MASTER_PORT, global rank (all ranks local)
    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()  # on every rank (multi-node and GPU runs have no segment: a no-op then)
    path.unlink(missing_ok=True)


def broadcast_str(value: str) -> str:
    import torch.distributed as dist
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---- the run ------------------------------------------------------------------------------

class Trainer:
    """One run on this rank. Everything the loop and its helpers need is here: the plan
    (config, world size, accumulation), the engine and its objective, the data stream, the
    train state, the logger, the run folder, the evaluator and the stop request."""

    def __init__(self, plan: Plan, engine, data, state: checkpoint.TrainState, logger: MetricsLogger,
                 run_dir: Path, flops_per_sample: float, evaluator: Evaluator | None = None,
                 stop: StopRequest | None = None):
        self.plan, self.cfg = plan, plan.cfg
        self.engine, self.objective = engine, engine.module.objective
        self.data, self.state, self.logger, self.run_dir = data, state, logger, run_dir
        self.flops_per_sample, self.evaluator, self.stop = flops_per_sample, evaluator, stop
        self.window = Window()
        self.heartbeat: Heartbeat | None = None  # train() starts it
        bf16 = bool(plan.ds_config.get("bf16", {}).get("enabled"))
        self.peak_tflops, peak_source = peak_tflops(self.cfg.tracking.peak_tflops, engine.device, bf16)
        if logger.enabled:
            print(f"[train] mfu: {'against ' if self.peak_tflops else ''}{peak_source}", flush=True)
        self.scales = engine.module.logit_scale_bounds()
        self.image_tokens = engine.module.encoder.arch.grid_size ** 2  # patch tokens of an image

    def train(self):
        """The loop: step, log, evaluate, save. Everything else lives in methods of its own."""
        cfg, state = self.cfg, self.state
        clamp_logit_scales(self.scales)  # FILIP's init ln(1/0.07) lies below its floor 3
        batches = self.data.forever()
        self.window, first_step = Window(), state.step + 1
        self.heartbeat = heartbeat = Heartbeat(  # a hung or lost peer ends the group
            self.run_dir, ranks.world()[0], cfg.train.timeout_minutes, cfg.train.step_timeout_minutes,
            floor_seconds=read_budget(self.plan), on_deadline=set_collective_timeout if self.plan.world > 1 else None)
        try:
            while state.step < cfg.train.steps:
                batch = next(batches)
                self.window.tokens_kept = token_schedule(batch, state.step, cfg, self.image_tokens)
                out = train_step(self.engine, batch, self.objective, self.plan.accum,
                                 lr_factor(state.step, cfg.optim, cfg.train.steps), self.scales)
                state.step += 1
                if state.step == first_step:
                    self.report_first_step()
                heartbeat.beat(state.step)
                state.samples_seen += cfg.train.global_batch_size
                self.window.add(out)
                if cfg.train.batch_digests:  # which samples made this step: the same on any topology
                    digest = global_batch_digest(batch["keys"], self.plan.world)
                    self.logger.event("batch", step=state.step, keys_sha1=digest)
                if out["skipped"]:
                    self.handle_nonfinite(batch)
                if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                    self.log_window(out)
                if self.evaluator and self.evaluator.due(state.step):
                    with heartbeat.doing(f"the evaluation at step {state.step} (eval.every_steps)"):
                        self.evaluate()
                saved = False  # the final step's save is the one after the loop
                if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < cfg.train.steps:
                    saved = self.periodic_save()
                if self.stop and state.step < cfg.train.steps and self.stop.agreed(self.engine.device):
                    self.preempt(saved)
            self.save("the final checkpoint save")  # never skipped
        finally:  # whatever ends the loop: the watchdog has no step to wait for any more
            heartbeat.stop()

    def report_first_step(self):
        """A start's first step pays the compilation (model.compile), the loader's start-up and
        the allocator's warm-up: it is reported on its own (first_step_s) and left out of
        the throughput of the window it falls in."""
        self.window.first_step_s = seconds = time.perf_counter() - self.window.started
        self.logger.log_metrics({"first_step_s": seconds}, self.state.step)
        if self.logger.enabled:
            print(f"[train] first step: {seconds:.1f} s{' (model.compile)' if self.cfg.model.compile else ''}",
                  flush=True)

    def evaluate(self):
        started = time.perf_counter()
        self.logger.log_metrics(self.evaluator(self.engine), self.state.step)
        self.window.started += time.perf_counter() - started  # evaluation time is not training throughput

    def save(self, what: str = "the checkpoint save"):
        """Everything a resume needs: the engine's state, the data position and the RNGs,
        captured now (the data position only here, not every step). A save is work between
        steps: it gets train.timeout_minutes, not the step deadline (lifecycle.py Heartbeat)."""
        with self.heartbeat.doing(f"{what} at step {self.state.step}"):
            self.state.data = self.data.state_dict()
            self.state.rng = checkpoint.capture_rng()
            checkpoint.save(self.engine, self.run_dir / "checkpoints", self.state, self.cfg.train.keep_last,
                            resume_facts(self.cfg, self.engine.zero_optimization_stage()))

    def periodic_save(self) -> bool:
        """A save on the train.save_every schedule. With train.save_failure=continue, every
        rank first says whether it sees a reason the save would fail (weights/files.py
        save_blocker); if any does, all skip it together (DeepSpeed's save ends in a barrier
        that a rank whose write failed never reaches, so ranks cannot find out afterwards)
        and try at the next."""
        if self.cfg.train.save_failure == "continue":
            blocker = agreed_blocker(save_blocker(self.run_dir / "checkpoints"), self.engine.device)
            if blocker:
                self.logger.event("save_skipped", step=self.state.step, reason=blocker)
                if self.logger.enabled:
                    print(f"[train] checkpoint at step {self.state.step} skipped ({blocker}); training goes on, the "
                          f"next save tries again (train.save_failure=continue)", flush=True)
                return False
        self.save()
        return True

    def preempt(self, saved: bool):
        if not saved:  # not saved at this step already
            self.save()
        reason = self.stop.received or "a peer rank's stop request"
        self.logger.event("preempted", step=self.state.step, reason=reason)
        raise Preempted(reason, self.state.step)

    def handle_nonfinite(self, batch: dict):
        """Every rank sees the same skips (train_step's check is agreed), so every rank
        stops at the same step."""
        cfg, state = self.cfg, self.state
        state.skipped_steps += 1
        keys = batch.get("keys", [])[:4]
        msg = f"non-finite loss at step {state.step} (batch starting {keys})"
        self.logger.event("nonfinite_loss", step=state.step, keys=keys, policy=cfg.train.nan_policy)
        over = over_skip_budget(cfg.train, state.skipped_steps, self.window.skipped)
        if cfg.train.nan_policy == "stop" or over:
            self.save()
            raise FloatingPointError(f"{msg}; stopped ({over or 'train.nan_policy=stop'}), checkpoint saved at step "
                                     f"{state.step}")
        print(f"[train] {msg}: update skipped (train.nan_policy=skip)", flush=True)

    def log_window(self, out: dict):
        """The window's metrics on every rank's sums (every rank is here), the skip-rate
        check on them, and a line on rank 0."""
        cfg, engine, data, world = self.cfg, self.engine, self.data, self.plan.world
        now = time.perf_counter()
        samples_per_s = self.window.samples_per_s(cfg.train.global_batch_size, now)
        metrics = {"loss": self.window.mean_loss(), "loss_last": out["loss"],
                   "logit_scale": full_fp32(engine.module.encoder.logit_scale).exp(),
                   "samples_per_s": samples_per_s, "epoch": data.epoch, "samples_seen": self.state.samples_seen,
                   "skipped_steps": self.state.skipped_steps}
        metrics.update({k: v for k, v in out.items() if k.startswith("loss_")})
        metrics.update(mean_over_ranks({k: v for k, v in metrics.items() if k.startswith("loss") and v is not None},
                                       world, engine.device))
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        for group in engine.optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        if cfg.model.token_drop:
            metrics["tokens_kept"] = self.window.tokens_kept  # of the image's patch tokens, at this step
        if self.flops_per_sample:  # model FLOPs (pipeline/model/flops.py) per second and device
            metrics["tflops_per_device"] = self.flops_per_sample * samples_per_s / world / 1e12
            if self.peak_tflops:  # of the chip's spec peak (pipeline/train/mfu.py)
                metrics["mfu"] = metrics["tflops_per_device"] / self.peak_tflops
        good, truncated, skipped = summed_over_ranks(data.good(), data.truncated(), data.skipped(), engine.device)
        for reason, count in skipped.items():
            metrics[f"data_skipped/{reason}"] = count
        if truncated:
            metrics["data_truncated/caption"] = truncated  # cut at data.max_caption_bytes, still used
        self.logger.log_metrics(metrics, self.state.step)
        check_skip_rate(good, skipped, cfg.data.max_skip_rate,  # on every rank, on the same sums
                        lambda: shard_losses_over_ranks(data.shard_losses()))
        if self.logger.enabled:
            loss = "skipped" if metrics["loss"] is None else f"{float(metrics['loss']):.4f}"
            print(f"[train] step {self.state.step}/{cfg.train.steps} loss {loss} {samples_per_s:.1f} samples/s",
                  flush=True)
        self.window = Window(started=now)  # this logging's own time counts in the next window


@dataclasses.dataclass
class Window:
    """The steps since the last log line. A skipped (non-finite) step counts for throughput
    but not for the mean loss: its NaN would make the whole window's mean NaN."""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    skipped: int = 0
    losses: int = 0
    loss: float | torch.Tensor = 0.0  # summed on the device: read on log steps only
    tokens_kept: float = 1.0  # the fraction of patch tokens the last step kept
    first_step_s: float | None = None  # the start's first step, when it falls in this window

    def samples_per_s(self, global_batch: int, now: float) -> float:
        steps, seconds = self.steps, now - self.started
        if self.first_step_s is not None and steps > 1:  # timed on its own (Trainer.report_first_step)
            steps, seconds = steps - 1, seconds - self.first_step_s
        return steps * global_batch / seconds

    def add(self, out: dict):
        self.steps += 1
        self.skipped += out["skipped"]  # a host int (train_step's agreed check): no sync here
        if not out["skipped"]:
            self.loss = self.loss + out["loss"]
            self.losses += 1

    def mean_loss(self):
        return self.loss / self.losses if self.losses else None


def read_budget(plan: Plan) -> float:
    """The longest one remote shard's read may take before the loader gives it up (its
    timeouts, retries and backoffs): a step waiting on it is not a lost peer. 0 on local shards."""
    if not any(is_remote(url) for shards in plan.sources for url in shards.urls):
        return 0.0
    return plan.read.budget + 10.0


def set_collective_timeout(deadline_seconds: float):
    """The backend's collective timeout a minute after the watchdog's deadline (lifecycle.py)."""
    import torch.distributed as dist
    dist.set_timeout(timedelta(seconds=deadline_seconds + 60))


def token_schedule(batch: dict, step: int, cfg: RunConfig, image_tokens: int) -> float:
    """Token dropping (model.token_drop) at this step: the loader's kept positions, or,
    in the last train.unmasked_steps steps, every token (FLIP's unmasked tuning: the
    positions are taken out of the batch). Returns the fraction of patch tokens kept."""
    if "token_keep" not in batch:
        return 1.0
    if step >= cfg.train.steps - cfg.train.unmasked_steps:
        del batch["token_keep"]
        return 1.0
    return batch["token_keep"].shape[1] / image_tokens


def global_batch_digest(keys: list[str], world: int) -> str:
    """sha1 of the step's sample keys over every rank, sorted (a collective when world > 1)."""
    import torch.distributed as dist
    gathered = [keys]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, keys)
    return hashlib.sha1("|".join(sorted(k for part in gathered for k in part)).encode()).hexdigest()


def clamp_logit_scales(bounds: list):
    for param, low, high in bounds:
        clamp_logit_scale(param, low, high)


def agreed_blocker(local: str, device) -> str:
    """The first reason any rank has ("rank r: ..."), known to every rank; "" if none has
    one. Every rank calls it at the same step."""
    import torch.distributed as dist
    if ranks.world()[1] == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return ""
    reasons = [""] * ranks.world()[1]
    dist.all_gather_object(reasons, local)
    return next(f"rank {rank}: {why}" for rank, why in enumerate(reasons) if why)


def over_skip_budget(train_cfg, skipped_in_run: int, skipped_in_window: int) -> str:
    """Why the skipped steps are past train.max_skipped_steps, or "" while they are not."""
    limit = train_cfg.max_skipped_steps
    if limit >= 1 and skipped_in_run > limit:
        return f"{skipped_in_run} steps skipped, over train.max_skipped_steps={limit:g}"
    if limit < 1 and skipped_in_window > limit * train_cfg.log_every:
        return (f"{skipped_in_window} of a {train_cfg.log_every}-step window skipped, over "
                f"train.max_skipped_steps={limit:g} of it")
    return ""


def mean_over_ranks(values: dict, world: int, device) -> dict:
    """Each rank's loss is its rows' share of the global batch's loss: the mean over ranks is
    the global batch's, the same number on any topology (one all-reduce; every rank calls it)."""
    if world == 1 or not values:
        return values
    import torch.distributed as dist
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world).tolist()))
