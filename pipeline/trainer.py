"""The trainer: builds the model and the DeepSpeed engine for a validated run, resumes it,
runs the loop (step, log, evaluate, save) and exports the result. launch/train.py is the
entry point: it validates the run with pipeline/preflight.py (no torch) and then calls
`prepare` (the checks that need torch or DeepSpeed, still before any process group) and
`run`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from eval.during_training import PeriodicZeroShot
from pipeline import checkpoint, ranks
from pipeline.config import RunConfig, flatten, save_config, to_dict
from pipeline.data.debiased import make_stream
from pipeline.data.loader import (DataQualityError, DataStream, check_skip_rate, shard_losses_over_ranks,
                                  summed_over_ranks)
from pipeline.ds_config import accumulation_steps, check_against_deepspeed
from pipeline.data.recipe import ImageSpec
from pipeline.engine import (arch_list_deepspeed_can_parse, clamp_logit_scale, full_fp32, lr_factor, param_groups,
                             topology_free_grad_norm, train_step)
from pipeline.lifecycle import Heartbeat, Preempted, StopRequest, collective_timeout, stop_with_launcher
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.redact import redact
from pipeline.tracking import MetricsLogger, store_key


def prepare(cfg: RunConfig, ds_config: dict, deepspeed_config: str) -> tuple[PeriodicZeroShot | None, tuple | None]:
    """The checks that need torch or DeepSpeed, before any process group: the DeepSpeed
    JSON against DeepSpeed's own models, the eval set's contents, and model.init_from's
    weights (weights, key report), read here so that a bad file fails before launch."""
    check_against_deepspeed(ds_config, deepspeed_config)
    evaluator = PeriodicZeroShot(cfg.eval, cfg.train.steps) if cfg.eval.every_steps else None
    initial = None
    if cfg.model.init_from:
        from pipeline.interop import initial_weights
        initial = initial_weights(cfg.model.init_from, cfg.model.init_from_format, cfg.model.init_from_source,
                                  cfg.model.arch())
    return evaluator, initial


def start_from(model, state_dict: dict):
    """Load model.init_from's weights before DeepSpeed starts (it broadcasts rank 0's).
    DeCLIP's MLM adds a mask-token row the file does not have: it keeps its init."""
    own = model.state_dict()
    key = "text.token_embedding.weight"
    if key in state_dict and own[key].shape[0] > state_dict[key].shape[0]:
        state_dict = {**state_dict, key: torch.cat([state_dict[key], own[key][state_dict[key].shape[0]:]])}
    model.load_state_dict(state_dict)


def prepare_run_dir(cfg: RunConfig, ds_config: dict, module: TrainModule, run_name: str, rank: int) -> Path:
    """The run folder; model.json says what an export of its checkpoints is (pipeline/checkpoint.py
    `export` reads it): the encoder's architecture, which similarity the objective trained,
    and which objective heads evaluation keeps."""
    run_dir = Path(cfg.train.output_dir) / run_name
    if rank == 0:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # what goes out (the run folder, then MLflow's artifacts) goes without credentials
        (run_dir / "ds_config.json").write_text(json.dumps(redact(ds_config), indent=2))
        (run_dir / "model.json").write_text(json.dumps({
            "model_name": cfg.model.name, "arch": to_dict(module.encoder.arch), "config": redact(to_dict(cfg)),
            "similarity": module.similarity, "export_heads": module.export_heads()}, indent=2))
    return run_dir


def run_params(cfg: RunConfig, ds_config: dict, arch, counts: dict, world: int, accum: int) -> dict:
    """What MLflow compares runs on: the resolved config, the architecture, the DeepSpeed
    config, and the derived sizes."""
    return {**flatten(to_dict(cfg)), **flatten({"arch": to_dict(arch)}), **flatten({"ds": ds_config}),
            "world_size": world, "accumulation_steps": accum, "params_total": counts["total"],
            "params_shared": counts["shared"], "shared_fraction": round(counts["shared"] / counts["total"], 4),
            "params_objective_heads": counts["objective_heads"]}


def run(cfg: RunConfig, ds_config: dict, evaluator: PeriodicZeroShot | None, initial: tuple | None) -> int:
    """Train a validated run (launch/train.py validates it) on this process's rank: build the
    model and the engine, resume, train, export. Returns the exit status."""
    import deepspeed
    import torch.distributed as dist
    from pipeline.model import build_model
    from pipeline.model.flops import train_flops_per_sample

    stop = StopRequest()  # SIGTERM/SIGINT from here on: stop at a step boundary with a checkpoint
    stop_with_launcher(stop)
    ranks.init_process_group(collective_timeout(cfg.train.timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shm_workspace()
    accum = accumulation_steps(cfg.train, world)
    torch.manual_seed(cfg.train.seed)  # same init everywhere (DeepSpeed also broadcasts rank 0's)
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
    module = TrainModule(model, objective)
    run_name = cfg.train.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_name = broadcast_str(run_name)
    run_dir = prepare_run_dir(cfg, ds_config, module, run_name, rank)
    try:
        resume = agreed_resume(cfg.train.resume, run_dir / "checkpoints", rank)
        if resume:
            ds_config = resume_config(ds_config, *resume, cfg, rank)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    arch_list_deepspeed_can_parse()
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, cfg.optim),
                                      config=ds_config)
    topology_free_grad_norm(engine)
    if cfg.model.compile:
        engine.compile()  # in place, the forward compiles on the first step (the accelerator's backend: inductor)
    recipe = dataclasses.replace(objective.recipe(), token_drop=cfg.model.token_drop,
                                 image_tokens=model.arch.grid_size ** 2)  # the loader draws the kept tokens
    data = make_stream(cfg.data, recipe, batch_size=cfg.train.micro_batch_size * accum,
                       image=ImageSpec(model.arch.image_size, cfg.data.normalization or model.arch.normalization),
                       context_length=model.arch.context_length, seed=cfg.train.seed, rank=rank, world=world,
                       uint8=cfg.data.uint8_batches)
    data.local_skip_check = False  # data.max_skip_rate is checked on the sums of all ranks (log_window)
    state = checkpoint.TrainState()
    if resume:
        try:
            state = checkpoint.load(engine, *resume)
        except checkpoint.UntrustedCheckpointError as e:
            print(f"error: train.resume: {e}", file=sys.stderr, flush=True)
            return 2
        try:
            data.load_state_dict(state.data)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        checkpoint.restore_rng(state.rng)
    logger = MetricsLogger(run_dir, cfg.tracking, cfg.train.output_dir, run_name, enabled=rank == 0,
                           run_id=state.mlflow_run_id,
                           tags={"model": cfg.model.name, "objective": "+".join(cfg.objective.weights), "world_size": world,
                                 "dataset": cfg.data.train_shards,
                                 **({"mlflow.parentRunId": cfg.tracking.parent_run_id}
                                    if cfg.tracking.parent_run_id else {})})
    state.mlflow_run_id = logger.run_id
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
    if rank == 0:
        print(f"[train] run {run_dir} ({'resumed at step %d' % state.step if resume else 'fresh'})\n"
              f"[train] mlflow store: {store_key(logger.uri)} (tracking.mode={cfg.tracking.mode})\n"
              f"[train] resolved config:\n{json.dumps(redact(to_dict(cfg)), indent=1)}", flush=True)
        if initial:
            print(f"[train] model.init_from {cfg.model.init_from}: {initial[1]}", flush=True)
            if not resume:
                from pipeline.interop import sha256
                logger.set_tags({"init_from_keys": initial[1], "init_from_sha256": sha256(cfg.model.init_from)})
        if not resume:
            logger.log_params(run_params(cfg, ds_config, model.arch, counts, world, accum))
            for name in ("config.yaml", "ds_config.json", "model.json"):
                logger.log_artifact(run_dir / name)
    status = "FAILED"
    try:
        train(engine, data, state, logger, cfg, run_dir, accum, flops_per_sample, world, objective, evaluator, stop)
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
    finally:
        logger.close(status)
    if rank == 0:
        exported = checkpoint.export(run_dir / "checkpoints", run_dir / "model.pt", mlflow_run_id=logger.run_id)
        print(f"[train] done: {state.step} steps; weights for eval: {exported}", flush=True)
        if cfg.tracking.log_model:
            logger.log_model(exported)
    return 0


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


def agreed_resume(resume: str, ckpt_dir: Path, rank: int) -> tuple[Path, str] | None:
    """Rank 0 picks the checkpoint (verifying its checksums, falling back past a damaged
    one) and every rank loads that one."""
    chosen = ""
    if rank == 0:
        try:
            found = checkpoint.resolve_resume(resume, ckpt_dir, verify=True)
            chosen = str(found[0] / found[1]) if found else ""
        except FileNotFoundError as e:  # every rank must hear it, or they wait in the broadcast
            chosen = f"error: {e}"
    chosen = broadcast_str(chosen)
    if chosen.startswith("error: "):
        raise FileNotFoundError(chosen[len("error: "):])
    return (Path(chosen).parent, Path(chosen).name) if chosen else None


def resume_config(ds_config: dict, ckpt_dir: Path, tag: str, cfg: RunConfig, rank: int) -> dict:
    """The DeepSpeed config to resume `tag` with: as it is, or, when the checkpoint comes
    from another world size or ZeRO stage, reading DeepSpeed's universal form of it (rank 0
    converts it once; every rank waits for it)."""
    import torch.distributed as dist
    world, stage = dist.get_world_size(), ds_config.get("zero_optimization", {}).get("stage", 0)
    written = checkpoint.check_resumable(ckpt_dir, tag, world, stage, cfg)  # ValueError: one line
    if not checkpoint.needs_universal(written, world, stage):
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


def broadcast_str(value: str) -> str:
    import torch.distributed as dist
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def train(engine, data: DataStream, state, logger, cfg: RunConfig, run_dir: Path, accum: int,
          flops_per_sample: float, world: int, objective: ComposedObjective,
          evaluator: PeriodicZeroShot | None = None, stop: StopRequest | None = None):
    """The loop: step, log, evaluate, save. Everything else lives in functions of its own."""
    scales = engine.module.logit_scale_bounds()
    clamp_logit_scales(scales)  # FILIP's init ln(1/0.07) lies below its floor 3
    window = new_window()
    image_tokens = engine.module.encoder.arch.grid_size ** 2  # patch tokens of an image
    batches = data.forever()
    heartbeat = Heartbeat(run_dir, ranks.world()[0], cfg.train.timeout_minutes)  # a hung peer ends the group
    while state.step < cfg.train.steps:
        batch = next(batches)
        window["tokens_kept"] = token_schedule(batch, state.step, cfg, image_tokens)
        out = train_step(engine, batch, objective, accum, lr_factor(state.step, cfg.optim, cfg.train.steps), scales)
        state.step += 1
        heartbeat.beat(state.step)
        state.samples_seen += cfg.train.global_batch_size
        add_to_window(window, out)
        if cfg.train.batch_digests:  # which samples made this step: the same on any topology
            logger.event("batch", step=state.step, keys_sha1=global_batch_digest(batch["keys"], world))
        if out["skipped"]:
            handle_nonfinite(engine, data, state, batch, cfg, run_dir, logger, window)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            log_window(logger, engine, data, state, out, window, cfg, flops_per_sample, world)
        if evaluator and evaluator.due(state.step):
            heartbeat.doing(f"the evaluation at step {state.step} (eval.every_steps)")
            evaluate_now(evaluator, engine, logger, state.step, window)
        saved = False  # the final step's save is the one after the loop
        if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < cfg.train.steps:
            heartbeat.doing(f"the checkpoint save at step {state.step}")
            saved = periodic_save(engine, data, run_dir, state, cfg, logger)
        if stop and state.step < cfg.train.steps and stop.agreed(engine.device):
            preempt(engine, data, run_dir, state, cfg, logger, stop, saved)
    heartbeat.doing(f"the final checkpoint save at step {state.step}")
    save_checkpoint(engine, data, run_dir, state, cfg)  # never skipped
    heartbeat.stop()


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


def preempt(engine, data, run_dir: Path, state, cfg: RunConfig, logger, stop: StopRequest, saved: bool):
    if not saved:  # not saved at this step already
        save_checkpoint(engine, data, run_dir, state, cfg)
    reason = stop.received or "a peer rank's stop request"
    logger.event("preempted", step=state.step, reason=reason)
    raise Preempted(reason, state.step)


def clamp_logit_scales(bounds: list):
    for param, low, high in bounds:
        clamp_logit_scale(param, low, high)


def new_window() -> dict:
    return {"loss": 0.0, "losses": 0, "steps": 0, "skipped": 0, "time": time.perf_counter()}


def add_to_window(window: dict, out: dict):
    """A step into the logging window. A skipped (non-finite) step counts for throughput
    but not for the mean loss: its NaN would make the whole window's mean NaN."""
    window["steps"] += 1
    window["skipped"] += out["skipped"]  # a host int (train_step's agreed check): no sync here
    if not out["skipped"]:
        window["loss"] = window["loss"] + out["loss"]
        window["losses"] += 1


def evaluate_now(evaluator: PeriodicZeroShot, engine, logger, step: int, window: dict):
    started = time.perf_counter()
    logger.log_metrics(evaluator(engine), step)
    window["time"] += time.perf_counter() - started  # evaluation time is not training throughput


def save_checkpoint(engine, data, run_dir: Path, state, cfg: RunConfig):
    """Everything a resume needs: the engine's state, the data position and the RNGs,
    captured now (the data position only here, not every step)."""
    state.data = data.state_dict()
    state.rng = checkpoint.capture_rng()
    checkpoint.save(engine, run_dir / "checkpoints", state, cfg.train.keep_last,
                    checkpoint.resume_facts(cfg, engine.zero_optimization_stage()))


def periodic_save(engine, data, run_dir: Path, state, cfg: RunConfig, logger) -> bool:
    """A save on the train.save_every schedule. With train.save_failure=continue, every rank
    first says whether it sees a reason the save would fail (checkpoint_files.save_blocker);
    if any does, all skip it together (DeepSpeed's save ends in a barrier that a rank whose
    write failed never reaches, so ranks cannot find out afterwards) and try at the next."""
    if cfg.train.save_failure == "continue":
        blocker = agreed_blocker(checkpoint.save_blocker(run_dir / "checkpoints"), engine.device)
        if blocker:
            logger.event("save_skipped", step=state.step, reason=blocker)
            if logger.enabled:
                print(f"[train] checkpoint at step {state.step} skipped ({blocker}); training goes on, the next "
                      f"save tries again (train.save_failure=continue)", flush=True)
            return False
    save_checkpoint(engine, data, run_dir, state, cfg)
    return True


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


def handle_nonfinite(engine, data, state, batch, cfg: RunConfig, run_dir: Path, logger, window: dict):
    """Every rank sees the same skips (train_step's check is agreed), so every rank stops
    at the same step."""
    state.skipped_steps += 1
    keys = batch.get("keys", [])[:4]
    msg = f"non-finite loss at step {state.step} (batch starting {keys})"
    logger.event("nonfinite_loss", step=state.step, keys=keys, policy=cfg.train.nan_policy)
    over = over_skip_budget(cfg.train, state.skipped_steps, window["skipped"])
    if cfg.train.nan_policy == "stop" or over:
        save_checkpoint(engine, data, run_dir, state, cfg)
        why = over or "train.nan_policy=stop"
        raise FloatingPointError(f"{msg}; stopped ({why}), checkpoint saved at step {state.step}")
    print(f"[train] {msg}: update skipped (train.nan_policy=skip)", flush=True)


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


def log_window(logger, engine, data: DataStream, state, out: dict, window: dict, cfg: RunConfig,
               flops_per_sample: float, world: int):
    now = time.perf_counter()
    samples_per_s = window["steps"] * cfg.train.global_batch_size / (now - window["time"])
    metrics = {"loss": window["loss"] / window["losses"] if window["losses"] else None, "loss_last": out["loss"],
               "logit_scale": full_fp32(engine.module.encoder.logit_scale).exp(),
               "samples_per_s": samples_per_s, "epoch": data.epoch, "samples_seen": state.samples_seen,
               "skipped_steps": state.skipped_steps}
    metrics.update({k: v for k, v in out.items() if k.startswith("loss_")})
    metrics.update(mean_over_ranks({k: v for k, v in metrics.items() if k.startswith("loss") and v is not None},
                                   world, engine.device))
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    for group in engine.optimizer.param_groups:
        metrics[f"lr/{group['name']}"] = group["lr"]
    if cfg.model.token_drop:
        metrics["tokens_kept"] = window["tokens_kept"]  # of the image's patch tokens, at this step
    if cfg.tracking.peak_tflops and flops_per_sample:
        metrics["mfu"] = flops_per_sample * samples_per_s / (cfg.tracking.peak_tflops * 1e12 * world)
    good, truncated, skipped = summed_over_ranks(data.good(), data.truncated(), data.skipped(),
                                                 engine.device)  # every rank is here
    for reason, count in skipped.items():
        metrics[f"data_skipped/{reason}"] = count
    if truncated:
        metrics["data_truncated/caption"] = truncated  # cut at data.max_caption_bytes, still used
    logger.log_metrics(metrics, state.step)
    check_skip_rate(good, skipped, cfg.data.max_skip_rate,  # on every rank, on the same sums
                    lambda: shard_losses_over_ranks(data.shard_losses()))
    if logger.enabled:
        loss = "skipped" if metrics["loss"] is None else f"{float(metrics['loss']):.4f}"
        print(f"[train] step {state.step}/{cfg.train.steps} loss {loss} {samples_per_s:.1f} samples/s", flush=True)
    window.update(new_window(), time=now)
