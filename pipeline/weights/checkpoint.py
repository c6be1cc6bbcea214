"""Checkpoints: DeepSpeed's sharded format plus our train state, resumable exactly;
saving, loading, and DeepSpeed's universal form.

Layout under `<run dir>/checkpoints/`:

    step_00000200/                 DeepSpeed's files (model, ZeRO optimizer shards)
        train_state_rank0.json     step, samples seen, this rank's data position, RNG states
        train_state_rank1.json
        COMPLETE.json              written last, atomically, after every rank has finished

A checkpoint without COMPLETE.json (the process was killed while writing it) is never
picked by `resume=latest`, and DeepSpeed's own `latest` file is not used. Nothing here
unpickles arbitrary objects: our state is JSON, and DeepSpeed's files are read with
torch's weights-only unpickler (`safe_torch_load`). Which checkpoints are complete and
intact, and which one `train.resume` means: pipeline/weights/files.py (plain Python); the
consolidated export for evaluation: pipeline/weights/export.py.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.ranks import world
from pipeline.weights.files import COMPLETE, UNIVERSAL, checksums, prune, tag_for, write_json_atomic


@dataclass
class TrainState:
    """Everything a restart needs besides the model and optimizer."""
    step: int = 0
    samples_seen: int = 0
    data: dict = field(default_factory=dict)  # DataStream.state_dict() of this rank, at the save
    rng: dict = field(default_factory=dict)
    mlflow_run_id: str = ""
    skipped_steps: int = 0  # non-finite losses skipped


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def restore_rng(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- weights-only loading of DeepSpeed's files -------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The few non-tensor types DeepSpeed puts in its checkpoint files (plain data classes)."""
    # import_module, not attribute access: deepspeed.utils.tensor_fragment is shadowed by a
    # class of the same name in deepspeed.utils.
    wanted = [("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
              ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
              ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
              ("deepspeed.utils.tensor_fragment", "fragment_address")]
    return [getattr(importlib.import_module(mod), name) for mod, name in wanted
            if hasattr(importlib.import_module(mod), name)]


class UntrustedCheckpointError(pickle.UnpicklingError):
    pass


class CheckpointSaveError(RuntimeError):
    """A save that failed (a full disk, a quota, a read-only mount): one line."""


@contextlib.contextmanager
def safe_torch_load():
    """Within the block every torch.load is weights-only: DeepSpeed's loaders (engine
    load_checkpoint, zero_to_fp32) call torch.load(weights_only=False) themselves, and a
    checkpoint directory is not to be trusted with arbitrary code."""
    original = torch.load

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: the one setting that would
            # run the payload. Ours says what the file is and that nothing ran.
            raise UntrustedCheckpointError(
                f"{f}: refused: it holds pickled objects other than weights (loading it would run code); "
                f"nothing from it was executed") from None

    # add_safe_globals, not the safe_globals context: that one is thread-local, and
    # DeepSpeed reads checkpoint shards from a thread pool.
    torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


# ---- save / find / load ---------------------------------------------------------------------

def save(engine, ckpt_dir: str | Path, state: TrainState, keep_last: int, facts: dict | None = None) -> Path:
    """Save on every rank; returns the tag directory. Rank 0 marks it complete once all
    ranks are done, then prunes old checkpoints. `facts`: what a resume must keep
    (checkpoint_files.resume_facts), recorded in COMPLETE.json."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    ckpt_dir = Path(ckpt_dir)
    rank, size = world()
    tag = tag_for(state.step)
    # the universal checkpoint conversion wants this entry (Megatron-DeepSpeed's clients write it)
    client_state = {"step": state.step,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        write_json_atomic(ckpt_dir / tag / f"train_state_rank{rank}.json", asdict(state))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        free = shutil.disk_usage(ckpt_dir).free
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0])[:200]
        # no COMPLETE.json is written and nothing is pruned: the previous checkpoints stay resumable
        raise CheckpointSaveError(f"checkpoint {ckpt_dir / tag} could not be written on rank {rank} ({reason}); "
                                  f"{free / 1e6:,.0f} MB free there; the previous complete checkpoints are kept") \
            from None
    if size > 1:
        dist.barrier()
    if rank == 0:
        write_json_atomic(ckpt_dir / tag / COMPLETE, {"step": state.step, "world_size": size, "time": time.time(),
                                                       "facts": facts or {}, "sha256": checksums(ckpt_dir / tag)})
        prune(ckpt_dir, keep_last)
    if size > 1:
        dist.barrier()
    return ckpt_dir / tag


def load(engine, ckpt_dir: Path, tag: str) -> TrainState:
    """The engine's state and ours. A checkpoint from another world size or ZeRO stage is
    read from its universal form (`to_universal`; the engine was made with
    checkpoint.load_universal) and the data position is every rank's, joined by the stream."""
    rank, size = world()
    written = json.loads((ckpt_dir / tag / COMPLETE).read_text())
    universal = engine.load_universal_checkpoint()
    with safe_torch_load():
        if universal:
            path, _ = engine.load_checkpoint(str(ckpt_dir / tag), tag=UNIVERSAL, load_lr_scheduler_states=False)
        else:
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
    if written["world_size"] == size:
        return TrainState(**json.loads((ckpt_dir / tag / f"train_state_rank{rank}.json").read_text()))
    ranks = [json.loads((ckpt_dir / tag / f"train_state_rank{r}.json").read_text())
             for r in range(written["world_size"])]
    mine = ranks[rank] if rank < len(ranks) else ranks[0]  # the RNG states: this rank's where it had one
    return TrainState(**{**mine, "data": {"from_ranks": [r["data"] for r in ranks]}})


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """DeepSpeed's universal checkpoint of `tag` (fp32 weights, both Adam moments and the
    step, per parameter, unpartitioned), made once and kept in `<tag>/universal/` (it goes
    when the checkpoint is pruned). Written aside and renamed, so a conversion killed
    midway is never taken for a finished one. Call on one rank."""
    from deepspeed.checkpoint import ds_to_universal
    out = ckpt_dir / tag / UNIVERSAL
    if out.is_dir():
        return out
    tmp = ckpt_dir / tag / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with safe_torch_load(), contextlib.redirect_stdout(sys.stderr):  # its progress is not our output
        ds_to_universal.main(args)
    os.replace(tmp, out)
    return out
