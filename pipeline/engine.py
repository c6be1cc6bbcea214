"""DeepSpeed glue: config fill with the batch arithmetic checked in one place, MS-CLIP's
optimizer groups, the learning-rate schedule as a pure function of the step, and
`train_step`.

Gradient accumulation and the contrastive objective: DeepSpeed's accumulation sums
the gradients of per-micro-batch losses, so each micro-batch would contrast against
micro x world negatives instead of the global batch; that is a different objective.
Whenever global_batch_size > micro_batch_size x world, `train_step` instead computes
the global-batch loss from features cached without grad, then re-runs each micro-batch
with grad and backpropagates the cached feature gradients (GradCache, Gao et al. 2021;
ZeroVL's decoupled gradient accumulation): the gradients equal one big batch's.
DeepSpeed's plain accumulation is not offered.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ConfigError, OptimConfig, TrainConfig
from pipeline.data.loader import pixels_on_device
from pipeline.model import MAX_LOGIT_SCALE

log = logging.getLogger(__name__)

# Keys the run config owns; a DeepSpeed JSON that sets them would silently disagree.
RUN_CONFIG_KEYS = {"train_batch_size": "train.global_batch_size",
                   "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                   "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x world size)",
                   "gradient_clipping": "optim.grad_clip"}


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    for key, owner in RUN_CONFIG_KEYS.items():
        if key in ds:
            raise ConfigError(f"{path}: '{key}' belongs in the run config ({owner}), not in the DeepSpeed config")
    for key in ("lr", "weight_decay", "betas", "eps"):
        if key in ds.get("optimizer", {}).get("params", {}):
            raise ConfigError(f"{path}: optimizer.params.{key} belongs in the run config (optim.{key})")
    check_ds_keys(ds, path)
    return ds


def check_ds_keys(ds: dict, path: Path):
    """DeepSpeed ignores a key it does not know: a misspelled "zero_optimisation" trains
    without ZeRO, "stage" inside a misspelled section with the default. Before any
    process starts: zero_optimization against DeepSpeed's own model of it (pydantic,
    unknown fields forbidden, stage in 0-3), and a top-level key that is not DeepSpeed's
    but nearly matches one of its keys is named with the key it probably meant."""
    import difflib

    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    for key in ds:
        if key not in DS_TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(key, DS_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
            if near:
                raise ConfigError(f"{path}: unknown DeepSpeed key '{key}'; did you mean '{near[0]}'?")
    check_optimizer_type(ds, path)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage: {zero['stage']!r} is not a ZeRO stage (0, 1, 2 or 3)")
    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        fields = DeepSpeedZeroConfig.model_fields
        known = sorted({*fields, *(f.alias for f in fields.values() if f.alias)})  # the JSON spells some by alias
        hint = difflib.get_close_matches(where, known, n=1, cutoff=0.6) if error["type"] == "extra_forbidden" else []
        raise ConfigError(f"{path}: zero_optimization.{where}: {error['msg']}"
                          + (f"; did you mean '{hint[0]}'?" if hint else "")) from None


def check_optimizer_type(ds: dict, path: Path):
    """DeepSpeed accepts its own optimizers (any case) and torch.optim's classes by name
    (engine._is_supported_optimizer); anything else was a traceback on every rank after
    the process group started (issue 22)."""
    name = ds.get("optimizer", {}).get("type")
    if name is None:
        return
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    if not isinstance(name, str) or (name.lower() not in DEEPSPEED_OPTIMIZERS
                                     and not isinstance(getattr(torch.optim, name, None), type)):
        raise ConfigError(f"{path}: optimizer.type: {name!r} is neither a DeepSpeed optimizer "
                          f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class")


# DeepSpeed's top-level configuration sections and scalars (deepspeed/runtime/config.py
# reads them; docs: deepspeed.ai/docs/config-json), for the near-miss check above.
DS_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "seq_parallel_communication_data_type", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "aio", "elasticity", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
    "checkpoint", "data_types", "compile", "memory_breakdown", "disable_allgather", "dataloader_drop_last",
    "gradient_allreduce_op", "load_universal_checkpoint", "use_node_local_storage", "pipeline", "nebula",
    "weight_quantization", "hybrid_engine", "eigenvalue", "progressive_layer_drop", "sparse_attention",
    "timers", "graph_harvesting", "use_data_before_expert_parallel_", "disable_python_gc", "zero_quantized_weights",
)


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size: {train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size {train.micro_batch_size} x world size {world_size}")
    return train.global_batch_size // per_step


def fill_ds_config(ds: dict, train: TrainConfig, optim: OptimConfig, world_size: int) -> dict:
    """The DeepSpeed config the engine runs with: the file's knobs plus batch sizes,
    accumulation, clipping and optimizer hyper-parameters from the run config."""
    accum = accumulation_steps(train, world_size)
    ds = copy.deepcopy(ds)
    ds["train_batch_size"] = train.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = accum
    ds["gradient_clipping"] = optim.grad_clip
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=optim.lr, betas=list(optim.betas), eps=optim.eps,
                                        weight_decay=optim.weight_decay)
    assert ds["train_batch_size"] == train.micro_batch_size * accum * world_size
    return ds


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups as MS-CLIP configures them: no weight decay on norms, biases,
    embeddings and the logit scale (1-d tensors + model.no_weight_decay()); the modules
    both towers share get their own lr and weight decay (LR_SHARE / WD_SHARE)."""
    shared = {id(p) for p in model.shared_parameters()}
    no_decay_names = model.no_weight_decay()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and name not in no_decay_names
        groups.setdefault((id(p) in shared, decay), []).append(p)
    out = []
    for (is_shared, decay), params in sorted(groups.items()):
        lr = optim.shared_lr if is_shared and optim.shared_lr is not None else optim.lr
        wd = optim.shared_weight_decay if is_shared and optim.shared_weight_decay is not None else optim.weight_decay
        out.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": wd if decay else 0.0,
                    "name": f"{'shared' if is_shared else 'tower'}_{'decay' if decay else 'no_decay'}"})
    return out


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of each group's base lr at `step` (0-based): linear warmup from
    1/warmup to 1, then cosine or linear decay to min_lr/lr at the last step."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr / optim.lr
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def set_learning_rates(optimizer, factor: float):
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@torch.no_grad()
def full_fp32(param: nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter, also when ZeRO keeps it partitioned or in bf16."""
    from deepspeed.utils import safe_get_full_fp32_param
    master = safe_get_full_fp32_param(param)
    return (param if master is None else master).detach().float()


@torch.no_grad()
def clamp_logit_scale(param: nn.Parameter, low: float = 0.0, high: float = MAX_LOGIT_SCALE):
    """Keep a stored log-scale in [low, high] (objectives.logit_scale_bounds: the model's
    [0 or DeCLIP's 3, ln 100], FILIP's [3, 6]). Under ZeRO the fp32 master copy lives in
    the optimizer, so that is the copy to clamp; the model also clamps its own scale at
    ln 100 in its forward, so that effective scale never exceeds 100 in between."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    if hasattr(param, "ds_id"):
        # ZeRO-3: DeepSpeed 0.19.8's set_full_hp_param cannot write a parameter with fewer
        # elements than ranks (it narrows past the end). The forward clamp alone keeps the
        # effective scale <= 100 (and the gradient above it is zero); a lower bound
        # (DeCLIP's) is not enforced under ZeRO-3 (README, known limits).
        return
    master = safe_get_full_fp32_param(param)
    if master is None:  # no DeepSpeed optimizer wraps it: the parameter is the master
        param.clamp_(low, high)
    else:
        safe_set_full_fp32_param(param, master.clamp(low, high))


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Run forwards without moving BatchNorm running statistics (the caching pass of the
    exact accumulation: the grad pass after it updates them once, as a plain step would)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        for m, (mean, var, n) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)


def nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """The step's one host sync: every rank must take the same skip-or-step branch."""
    return any_rank(not torch.isfinite(loss).item())


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank must take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def split_batch(batch: dict, parts: int) -> list[dict]:
    n = batch["images"].shape[0]
    if n % parts:
        raise ValueError(f"a batch of {n} does not split into {parts} micro-batches")
    size = n // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items() if torch.is_tensor(v)} for i in range(parts)]


def batch_on_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of the batch on the model's device, in this one place: uint8 pixels
    are normalized there (data.uint8_batches), and the objective terms never meet a host
    tensor (FILIP builds its padding mask from `text`; under NCCL a host tensor would
    also be all-gathered from the host). The `keys` list stays on the host."""
    batch = pixels_on_device(batch, device)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["images"].to(dtype=dtype, memory_format=memory_format), batch["text"]


def features_loss(loss_fn, out: dict) -> tuple[torch.Tensor, dict]:
    """The objective on fp32 copies of the features (logits in bf16 lose too much)."""
    return loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())


def train_step(engine, batch: dict, loss_fn, accum: int, nonfinite=nonfinite_on_any_rank) -> dict:
    """One optimizer step over a local batch of `accum` micro-batches.

    loss_fn: either loss_fn(image_features, text_features, logit_scale) -> (loss, components)
    (plain CLIP), or a pipeline.objectives.ComposedObjective, which says what else the
    forward must compute (`model_kwargs`) and scores the whole output. Returns device
    tensors (no host sync here beyond `nonfinite`, the check every rank must agree on):
    loss, components, skipped (0/1). Of the engine it uses only `module`, `device`,
    calling it, `backward` and `step`: the fake-device tests (tests/test_fake_cuda.py)
    run everything else with tensors that have a device but no values.
    """
    module = engine.module
    dtype = next(module.parameters()).dtype
    device = engine.device
    batch = batch_on_device(batch, device)
    # model.channels_last: the images in the layout the (converted) convolutions prefer
    layout = torch.channels_last if getattr(module, "channels_last", False) else torch.contiguous_format
    composed = hasattr(loss_fn, "model_kwargs")
    if composed and accum == 1:
        batch = loss_fn.prepare(batch)  # e.g. ZeroVL's pixel mixup
    score = (lambda out: loss_fn(out, batch)) if composed else (lambda out: features_loss(loss_fn, out))
    if accum == 1:
        kwargs = loss_fn.model_kwargs(batch, dtype) if composed else {}
        loss, components = score(engine(*model_inputs(batch, dtype, layout), **kwargs))
        if nonfinite(loss):
            return {"loss": loss.detach(), "skipped": 1, **{k: v.detach() for k, v in components.items()}}
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), "skipped": 0, **{k: v.detach() for k, v in components.items()}}
    if composed and not loss_fn.features_only:
        raise ValueError("exact accumulation needs an objective of the pooled features only (clip)")
    micro = split_batch(batch, accum)

    # Exact accumulation. Pass 1: features of every micro-batch, no grad, BN stats untouched.
    with torch.no_grad(), frozen_batchnorm_stats(module):
        outs = [module(*model_inputs(mb, dtype, layout)) for mb in micro]
    image = torch.cat([o["image_features"] for o in outs]).float().requires_grad_(True)  # (accum*B, E)
    text = torch.cat([o["text_features"] for o in outs]).float().requires_grad_(True)  # (accum*B, E)
    scale = outs[0]["logit_scale"].float().requires_grad_(True)
    with torch.enable_grad():
        loss, components = score({"image_features": image, "text_features": text, "logit_scale": scale})
        if nonfinite(loss):
            return {"loss": loss.detach(), "skipped": 1, **{k: v.detach() for k, v in components.items()}}
        loss.backward()
    # Pass 2: re-run each micro-batch with grad and push the cached feature gradients
    # through it; DeepSpeed sums them and steps at the accumulation boundary.
    B = micro[0]["images"].shape[0]
    for i, mb in enumerate(micro):
        out = engine(*model_inputs(mb, dtype, layout))
        rows = slice(i * B, (i + 1) * B)
        surrogate = (out["image_features"].float() * image.grad[rows]).sum() + \
                    (out["text_features"].float() * text.grad[rows]).sum()
        if i == 0:  # the scale is one parameter: its gradient enters once
            surrogate = surrogate + (out["logit_scale"].float() * scale.grad).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    return {"loss": loss.detach(), "skipped": 0, **{k: v.detach() for k, v in components.items()}}
