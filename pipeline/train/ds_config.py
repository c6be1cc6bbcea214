"""The DeepSpeed JSON: read, checked and filled from the run config, without importing
torch or DeepSpeed (launch/train.py validates before either is loaded), except
`check_against_deepspeed`, which asks DeepSpeed's own models and runs once DeepSpeed is
imported, still before any process group exists."""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from pipeline.config import ConfigError, OptimConfig, TrainConfig

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
    without ZeRO, "stage" inside a misspelled section with the default. A top-level key
    that is not DeepSpeed's but nearly matches one of its keys is named with the key it
    probably meant; the ZeRO stage is 0-3. The fields of zero_optimization and the
    optimizer's type are checked by `check_against_deepspeed`."""
    for key in ds:
        if key not in DS_TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(key, DS_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
            if near:
                raise ConfigError(f"{path}: unknown DeepSpeed key '{key}'; did you mean '{near[0]}'?")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage: {zero['stage']!r} is not a ZeRO stage (0, 1, 2 or 3)")


def check_against_deepspeed(ds: dict, path: str | Path):
    """zero_optimization against DeepSpeed's own model of it (pydantic, unknown fields
    forbidden), and the optimizer type against what DeepSpeed accepts. Imports DeepSpeed
    (seconds): launch/train.py calls it after the fast checks, before the process group."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    check_optimizer_type(ds, path)
    try:
        DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
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
    import torch
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
