"""DeepSpeed glue: MS-CLIP's optimizer groups, the learning-rate schedule as a pure
function of the step, and `train_step` (the DeepSpeed JSON itself: pipeline/ds_config.py).

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
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import OptimConfig
from pipeline.data.loader import pixels_on_device
from pipeline.model import MAX_LOGIT_SCALE

log = logging.getLogger(__name__)

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
