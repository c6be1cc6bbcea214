"""train.micro_batch_size=auto: the largest micro batch that fits this GPU, found by a
short probe before the engine starts, with activation checkpointing as the next step down.

The probe runs the real step's forward and backward (the objective, its views, token
dropping) on a copy of the module on the GPU, in the engine's dtype, over the first rows
of one real batch, and reads the allocator's peak. What the probe does not hold, DeepSpeed
will: the fp32 master weights (bf16 engine) and Adam's two moments (partitioned over the
ranks under ZeRO >= 1) and its communication buckets; they are added to the peak, and the
sum must stay under 90% of the GPU's memory (the rest for the allocator's fragmentation).

Candidates are the divisors of the rank's share of the global batch (micro batch x
accumulation x world must equal it): the search is a bisection over them, largest first
to fit wins. An objective that cannot run exact accumulation has one candidate, the
whole share. Every rank probes its own GPU; the group takes the smallest choice.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

MEMORY_SHARE = 0.9  # of the GPU's memory the step may plan to use
ADAM_STATE_BYTES = 8  # two fp32 moments per parameter


def micro_batch_candidates(per_rank: int, exact_accumulation: bool) -> list[int]:
    """The micro batches that divide the rank's share, ascending."""
    if not exact_accumulation:
        return [per_rank]
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate for which fits() holds, for a fits() that holds up to some size
    and not above it (memory grows with the batch): log2(len) probes. None if none fits."""
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    return best


def reserve_bytes(parameters: int, ds_config: dict, world: int) -> int:
    """What the engine will hold that the probe's copy does not: the fp32 master weights of a
    bf16/fp16 engine and Adam's moments, partitioned over the ranks from ZeRO stage 1, and
    the reduce and all-gather buckets (ZeRO 1-3: elements in the training dtype)."""
    half = training_dtype(ds_config) != torch.float32
    zero = ds_config.get("zero_optimization", {})
    states = parameters * (ADAM_STATE_BYTES + (4 if half else 0))
    if int(zero.get("stage", 0)) < 1:
        return states
    buckets = int(float(zero.get("reduce_bucket_size", 5e8)) + float(zero.get("allgather_bucket_size", 5e8)))
    return states // world + (2 if half else 4) * buckets


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed's engine casts the module to."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


class StepProbe:
    """fits(b): does the step's forward and backward over b samples, plus the engine's
    reserve, stay within the budget on this GPU."""

    def __init__(self, module: torch.nn.Module, batch: dict, dtype: torch.dtype, device: torch.device,
                 reserve: int, budget: int):
        from pipeline.train.engine import batch_on_device, model_batch
        self.module = copy.deepcopy(module).to(device=device, dtype=dtype).train()
        self.batch = batch_on_device(batch, device)
        self.model_batch, self.device, self.reserve, self.budget = model_batch, device, reserve, budget
        self.peaks: dict[int, int] = {}  # what each probe measured, for the report

    def __call__(self, size: int) -> bool:
        rows = {k: v[:size] for k, v in self.batch.items()}  # tensors and the keys list alike
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            loss, _ = self.module(self.model_batch(self.module.objective.prepare(rows), self.module))
            loss.backward()
            torch.cuda.synchronize(self.device)
            self.peaks[size] = torch.cuda.max_memory_allocated(self.device)
            return self.peaks[size] + self.reserve <= self.budget
        except torch.cuda.OutOfMemoryError:
            self.peaks[size] = -1
            return False
        finally:
            self.module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def close(self):
        del self.module, self.batch
        torch.cuda.empty_cache()


def probe_micro_batch(module, batch: dict, ds_config: dict, world: int, per_rank: int, exact_accumulation: bool,
                      device: torch.device) -> tuple[int, bool, str]:
    """(micro batch, activation checkpointing on, a line saying what was chosen and why).
    Raises ValueError when not even the smallest candidate fits with checkpointing."""
    dtype = training_dtype(ds_config)
    total = torch.cuda.get_device_properties(device).total_memory
    reserve = reserve_bytes(sum(p.numel() for p in module.parameters()), ds_config, world)
    budget = int(MEMORY_SHARE * total)
    candidates = micro_batch_candidates(per_rank, exact_accumulation)
    encoder = module.encoder
    was_checkpointing = encoder.visual.grad_checkpointing
    for checkpointing in (True,) if was_checkpointing else (False, True):  # the user's choice stands
        encoder.set_grad_checkpointing(checkpointing)
        probe = StepProbe(module, batch, dtype, device, reserve, budget)
        try:
            chosen = largest_fitting(candidates, probe)
        finally:
            probe.close()
            encoder.set_grad_checkpointing(was_checkpointing)
        if chosen is not None:
            gib = 2 ** 30
            return chosen, checkpointing, (
                f"train.micro_batch_size=auto: {chosen} (of {per_rank} per rank; "
                f"{'with' if checkpointing else 'without'} activation checkpointing): step peak "
                f"{probe.peaks[chosen] / gib:.1f} GiB + engine reserve {reserve / gib:.1f} GiB of "
                f"{budget / gib:.1f} GiB ({MEMORY_SHARE:.0%} of {torch.cuda.get_device_name(device)})")
    raise ValueError(f"train.micro_batch_size=auto: not even a micro batch of {candidates[0]} fits in "
                     f"{torch.cuda.get_device_name(device)} ({total / 2 ** 30:.0f} GiB) with activation checkpointing: "
                     f"use a smaller model, more ranks (ZeRO partitions the optimizer) or ZeRO-3")
