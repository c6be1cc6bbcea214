"""DeepSpeed glue: MS-CLIP's optimizer groups, the learning-rate schedule as a pure
function of the step, and `train_step`: the plain step and the exact-accumulation step,
each with its learning-rate set and logit-scale clamp (the loop around it:
pipeline/train/trainer.py; the DeepSpeed JSON itself: pipeline/train/ds_config.py).

Gradient accumulation and the contrastive objective: DeepSpeed's accumulation sums
the gradients of per-micro-batch losses, so each micro-batch would contrast against
micro x world negatives instead of the global batch; that is a different objective.
Whenever global_batch_size > micro_batch_size x world, `train_step` instead computes
the global-batch loss from features cached without grad, then re-runs each micro-batch
with grad and backpropagates the cached feature gradients (GradCache, Gao et al. 2021;
ZeroVL's decoupled gradient accumulation): the gradients equal one big batch's.
DeepSpeed's plain accumulation is not offered. Each micro-batch is scored as the rank of
a larger world holding its samples would score it, so that one process and several give
the same numbers (`exact_accumulation_step`; with `topology_free_grad_norm`, bit for bit
between one process and two: tests/test_elastic.py).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import OptimConfig
from pipeline.model import MAX_LOGIT_SCALE
from pipeline.pixels import PIXEL_KEYS, pixels_on_device
from pipeline.losses.gather import virtual_rank
from pipeline.ranks import world

log = logging.getLogger(__name__)

def arch_list_deepspeed_can_parse():
    """Strip the arch-specific suffix from TORCH_CUDA_ARCH_LIST ("9.0a" -> "9.0") before
    DeepSpeed JIT-builds an op. DeepSpeed 0.19.8 parses each entry as int.int
    (deepspeed/ops/op_builder/builder.py:710 compute_capability_args) and raised
    "invalid literal for int() with base 10: '0a'" building FusedAdam on an H200 whose
    image sets 9.0a (bench/RESULTS.md, 2026-12-04). FusedAdam uses no sm_90a-only
    instruction, so 9.0 builds the same kernel."""
    import os
    import re
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", arch)


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
    """Keep a stored log-scale in [low, high] (TrainModule.logit_scale_bounds: the model's
    [0 or DeCLIP's 3, ln 100], FILIP's [3, 6]). Under ZeRO the fp32 master copy lives in
    the optimizer, so that is the copy to clamp; the model also clamps its own scale at
    ln 100 in its forward, so that effective scale never exceeds 100 in between."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    if hasattr(param, "ds_id"):
        # ZeRO-3: DeepSpeed 0.19.8's set_full_hp_param cannot write a parameter with fewer
        # elements than ranks (it narrows past the end). The forward clamp alone keeps the
        # effective scale <= 100 (and the gradient above it is zero); a lower bound
        # (DeCLIP's) is not enforced under ZeRO-3 (docs/design.md, known limits).
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


def topology_free_grad_norm(engine):
    """Make ZeRO-1/2's gradient norm (what `optim.grad_clip` divides by, and the logged
    grad_norm) the same number on any world size. DeepSpeed 0.19.8 rounds each rank's sum of
    squared gradients to fp32 before the all-reduce (stage_1_and_2.py, get_grad_norm_direct),
    so the norm depends on how the parameters are cut into partitions, and in every step
    where clipping acts so does the update: 1 and 2 processes, otherwise bit-identical,
    parted by 3.4e-6 in 20 steps (tests/test_elastic.py). Here the sum stays
    in fp64 across ranks and is rounded once (ZeRO-3 already sums in fp64; ZeRO-0 takes the
    norm of the full gradient on every rank). Pipeline and model parallelism, which the
    original's `params` argument serves, are not used by this project."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    optimizer = engine.optimizer
    if type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload:
        return
    group = optimizer.dp_process_group

    def grad_norm(gradients, params, norm_type=2):
        if norm_type != 2:
            raise ValueError(f"gradient norm of type {norm_type}: only 2 is made topology-free")
        squares = torch.zeros((), dtype=torch.float64, device=optimizer.device)
        for g in gradients:
            if not getattr(g, "_zero_padding", False):
                flat = g.detach().reshape(-1).double()
                squares += torch.dot(flat, flat)
        dist.all_reduce(squares, group=group)
        norm = squares.sqrt().float()
        return torch.where(torch.isfinite(norm), norm, -1.0)  # DeepSpeed's mark of an invalid norm
    optimizer.get_grad_norm_direct = grad_norm


def nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
    """The step's one host sync: every rank must take the same skip-or-step branch."""
    return any_rank(not torch.isfinite(loss).item())


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank must take the same branch)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Micro-batch j holds rows j, j + parts, ...: with the loader's topology-free order
    (rank k of W holds global samples k + W m) it is exactly what rank k + W j would hold
    on W x parts processes, so per-micro-batch computations (BatchNorm statistics) and the
    order of the concatenated features match that run's (tests/test_elastic.py)."""
    n = batch["images"].shape[0]
    if n % parts:
        raise ValueError(f"a batch of {n} does not split into {parts} micro-batches")
    return [{k: v[i::parts] for k, v in batch.items() if torch.is_tensor(v)} for i in range(parts)]


def batch_on_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of the batch on the model's device, in this one place: uint8 pixels
    are normalized there (data.uint8_batches), and the objective terms never meet a host
    tensor (FILIP builds its padding mask from `text`; under NCCL a host tensor would
    also be all-gathered from the host). The `keys` list stays on the host."""
    batch = pixels_on_device(batch, device)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_batch(batch: dict, module: nn.Module) -> dict:
    """The batch as the encoder takes it: pixels and region features in the parameters'
    dtype, `images` in the layout the (converted) convolutions prefer (model.channels_last)."""
    dtype = next(module.parameters()).dtype
    layout = torch.channels_last if getattr(module.encoder, "channels_last", False) else torch.contiguous_format
    return {k: (v.to(dtype=dtype, memory_format=layout) if k == "images" else v.to(dtype=dtype))
            if torch.is_tensor(v) and k.startswith((*PIXEL_KEYS, "rois")) else v for k, v in batch.items()}


def step_result(loss: torch.Tensor, parts: dict, skipped: int) -> dict:
    """Device tensors (no host sync), and `skipped` as a host int: the agreed check."""
    return {"loss": loss.detach(), "skipped": skipped, **{k: v.detach() for k, v in parts.items()}}


def train_step(engine, batch: dict, objective, accum: int, lr_scale: float, scale_bounds=(),
               nonfinite=nonfinite_on_any_rank) -> dict:
    """One optimizer step over a local batch of `accum` micro-batches: the learning rate
    set to `lr_scale` x each group's base, forward, backward, update, and every learned
    log-temperature clamped into its bounds (TrainModule.logit_scale_bounds).

    `engine` wraps a pipeline.objectives.TrainModule; `objective` is its objective. Of the
    engine it uses only `module`, `device`, `optimizer.param_groups`, calling it,
    `backward` and `step`: the fake-device tests (tests/test_fake_cuda.py) run everything
    else with tensors that have a device but no values."""
    set_learning_rates(engine.optimizer, lr_scale)
    batch = batch_on_device(batch, engine.device)
    result = (plain_step if accum == 1 else exact_accumulation_step)(engine, batch, objective, accum, nonfinite)
    if not result["skipped"]:
        for param, low, high in scale_bounds:
            clamp_logit_scale(param, low, high)
    return result


def plain_step(engine, batch: dict, objective, accum: int, nonfinite) -> dict:
    """Accumulation 1: one engine forward scores the whole local batch."""
    batch = model_batch(objective.prepare(batch), engine.module)  # prepare: e.g. ZeroVL's pixel mixup
    loss, parts = engine(batch)
    if nonfinite(loss):
        return step_result(loss, parts, skipped=1)
    engine.backward(loss)
    engine.step()
    return step_result(loss, parts, skipped=0)


def exact_accumulation_step(engine, batch: dict, objective, accum: int, nonfinite) -> dict:
    """The global-batch loss over `accum` micro-batches with one big batch's gradients
    (GradCache; the module docstring says why).

    Micro-batch i of rank r is scored as rank v = r + W i of a world of W x accum would
    score it (split_batch gives it that rank's samples): its rows against every column in
    that world's rank order, its gradients scaled by 1/accum as DeepSpeed averages over
    ranks, the column gradients summed over virtual ranks as the all-reduce sums them. So
    each rank's share of the loss, and with 2 virtual ranks every gradient bit, is the same
    on W x accum processes (tests/test_elastic.py)."""
    if not objective.features_only:
        raise ValueError("exact accumulation needs an objective of the pooled features only (clip)")
    module = engine.module
    micro = [model_batch(mb, module) for mb in split_batch(batch, accum)]
    # Pass 1: features of every micro-batch, no grad, BatchNorm statistics untouched.
    with torch.no_grad(), frozen_batchnorm_stats(module):
        outs = [module(mb, score=False) for mb in micro]
    rank, world_size = world()
    columns = {key: virtual_rank_columns([o[key].float() for o in outs], world_size)
               for key in ("image_features", "text_features")}  # (W*accum*B, E)
    with torch.enable_grad():
        scored = [VirtualRankScore(objective, outs[i], columns, rank + world_size * i, world_size * accum)
                  for i in range(accum)]
        # each rank's share of the loss as a mean over its virtual ranks, in float64 as
        # trainer.mean_over_ranks takes the mean over real ones
        loss = torch.stack([s.loss.detach() for s in scored]).double().mean()
        parts = {k: torch.stack([s.parts[k].detach() for s in scored]).double().mean() for k in scored[0].parts}
        if nonfinite(loss):
            return step_result(loss, parts, skipped=1)
        # DeepSpeed divides the summed gradients by the W real ranks; 1/accum makes it W x accum, as on that many
        grads = [s.gradients(1.0 / accum) for s in scored]
    # the backward's all-reduce of the columns' gradients: over virtual ranks, then real ones
    received = {key: sum(g["columns"][key] for g in grads) for key in columns}
    if world_size > 1:
        for total in received.values():
            dist.all_reduce(total)
    # Pass 2: re-run each micro-batch with grad and push its features' gradients (its own
    # rows' plus its share of the columns') through it; DeepSpeed sums them at the boundary.
    B = micro[0]["images"].shape[0]
    for i, (mb, g) in enumerate(zip(micro, grads)):
        out = engine(mb, score=False)
        rows = slice((rank + world_size * i) * B, (rank + world_size * i + 1) * B)
        surrogate = (out["logit_scale"].float() * g["rows"]["logit_scale"]).sum()
        for key in columns:
            surrogate = surrogate + (out[key].float() * (g["rows"][key] + received[key][rows])).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    return step_result(loss, parts, skipped=0)


def virtual_rank_columns(local: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """Every rank's micro-batch features (no grad) in the order of a world of W x accum
    ranks: rank v = r + W i holds micro-batch i of rank r."""
    if world_size == 1:
        return torch.cat(local)
    gathered = [torch.empty_like(torch.cat(local)) for _ in range(world_size)]
    dist.all_gather(gathered, torch.cat(local).contiguous())
    by_rank = [g.chunk(len(local)) for g in gathered]
    return torch.cat([by_rank[v % world_size][v // world_size] for v in range(world_size * len(local))])


class VirtualRankScore:
    """The objective on one micro-batch's cached features, scored as virtual rank `rank` of
    `size` would score them: its rows against `columns` (every virtual rank's features)."""

    def __init__(self, objective, out: dict, columns: dict, rank: int, size: int):
        # leaves: the features of this micro-batch's rows and the logit scale, each of which
        # the grad pass pushes its gradient into
        self.leaves = {key: out[key].float().detach().requires_grad_(True) for key in (*columns, "logit_scale")}
        with virtual_rank(rank, size, {id(self.leaves[key]): columns[key] for key in columns}) as self.played:
            self.loss, self.parts = objective(self.leaves, {})

    def gradients(self, factor: float) -> dict:
        """Of factor x loss: "rows", the gradient of each leaf through its own rows' use, and
        "columns", the gradient the columns gathered from each got (zeros if unused)."""
        found = torch.autograd.grad(self.loss * factor, list(self.leaves.values()), allow_unused=True)
        rows = {key: torch.zeros_like(leaf) if g is None else g for (key, leaf), g in zip(self.leaves.items(), found)}
        columns = {key: self.played.column_gradient(leaf) for key, leaf in self.leaves.items() if key != "logit_scale"}
        return {"rows": rows, "columns": columns}
