"""Checkpoints: DeepSpeed's sharded format plus our train state, resumable exactly;
export of consolidated fp32 weights for evaluation.

Layout under `<run dir>/checkpoints/`:

    step_00000200/                 DeepSpeed's files (model, ZeRO optimizer shards)
        train_state_rank0.json     step, samples seen, this rank's data position, RNG states
        train_state_rank1.json
        COMPLETE.json              written last, atomically, after every rank has finished

A checkpoint without COMPLETE.json (the process was killed while writing it) is never
picked by `resume=latest`, and DeepSpeed's own `latest` file is not used. Nothing here
unpickles arbitrary objects: our state is JSON, and DeepSpeed's files are read with
torch's weights-only unpickler (`safe_torch_load`).

    python -m pipeline.checkpoint export --checkpoint runs/NAME/checkpoints [--tag step_00000200] --output model.pt
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

# the files of a checkpoint (also used before torch is imported: launch/train.py)
from pipeline.checkpoint_files import (COMPLETE, TAG_RE, UNIVERSAL, check_resumable, checksums,  # noqa: F401
                                       complete_tags, damage, needs_universal, prune, resolve_resume, resume_facts,
                                       save_blocker, tag_for, write_json_atomic)


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


# ---- export for evaluation ----------------------------------------------------------------

ENCODER = "encoder."  # the encoder's weights in the trainer's module (pipeline/objectives.py TrainModule)

def export(ckpt_dir: str | Path, output: str | Path, tag: str | None = None, mlflow_run_id: str = "") -> Path:
    """Consolidated fp32 weights + what it takes to rebuild the model, loadable with
    torch.load(weights_only=True). `mlflow_run_id`: the run that trained it, when the
    checkpoint was saved before the tracking store had created the run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.model.heads import heads_for_export
    ckpt_dir = Path(ckpt_dir)
    tag = tag or (complete_tags(ckpt_dir) or [None])[-1]
    if tag is None or not (ckpt_dir / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint{' ' + tag if tag else ''} to export")
    run_dir = ckpt_dir.parent
    meta = json.loads((run_dir / "model.json").read_text())
    with safe_torch_load():
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    train_state = json.loads((ckpt_dir / tag / "train_state_rank0.json").read_text())
    # The trainer's module is the encoder (`encoder.*`) and the objective (`objective.*`):
    # the export is the encoder, plus the heads model.json names (FILIP's token heads, which
    # token-wise evaluation needs) under their export names.
    encoder = {k[len(ENCODER):]: v for k, v in state_dict.items() if k.startswith(ENCODER)}
    if not encoder:  # the model itself was the engine's module before (commit 9ebeef0)
        raise ValueError(f"{ckpt_dir / tag}: written before the trainer wrapped the encoder (no 'encoder.*' "
                         f"weights); export it with a checkout before commit 9ebeef0")
    heads = heads_for_export(state_dict, meta.pop("export_heads", {}))
    payload = {**meta, "state_dict": {k: v.float().contiguous() for k, v in encoder.items()},
               "heads": {k: v.float().contiguous() for k, v in heads.items()},
               # which similarity evaluation measures: what the run trained (FILIP alone: "token")
               "similarity": meta.get("similarity", "pooled"),
               "step": int(tag.split("_")[1]), "checkpoint": str(ckpt_dir / tag),
               # lets `python -m eval --training-run` log into the run that trained it
               "mlflow_run_id": mlflow_run_id or train_state.get("mlflow_run_id", "")}
    output = Path(output)
    save_atomically(payload, output)
    return output


def load_exported(path: str | Path):
    """The model of an exported file, built and loaded; weights-only, so a file crafted to
    run code when unpickled is rejected instead of executed."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_payload(payload), payload


def model_from_payload(payload: dict):
    """The model of an export payload (a file's, or one `pipeline.interop` just imported)."""
    from pipeline.model import build_model
    from pipeline.model.heads import token_heads
    model = build_model(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    # FILIP's heads ride along when the run trained them; eval picks the similarity by
    # `similarity` (older exports and other objectives: "pooled")
    model.token_heads = token_heads(model.arch, payload.get("heads", {}))
    model.similarity = payload.get("similarity", "pooled")
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="consolidated fp32 weights for evaluation, or an export in open_clip's layout")
    ex.add_argument("--format", choices=("ours", "open_clip"), default="ours",
                    help="ours: from a run's checkpoints/; open_clip: from our export (model.pt) of a clip-* model")
    ex.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory (ours) or model.pt (open_clip)")
    ex.add_argument("--tag", help="e.g. step_00000200 (default: the newest complete one)")
    ex.add_argument("--output", required=True,
                    help="ours: a .pt file; open_clip: a folder (open_clip's hf-hub layout, any clip-* size), or a "
                         ".pt/.safetensors file of weights alone (sizes one of open_clip's named configs builds)")
    im = sub.add_parser("import", help="MS-CLIP / OpenAI / open_clip weights -> our export format (model.pt)")
    im.add_argument("--format", required=True, choices=("msclip", "openai", "open_clip"),
                    help="msclip: a released MS-CLIP checkpoint (Hxyou/MSCLIP state dict)")
    im.add_argument("--input", required=True, help="a state dict (.pt/.bin, read weights-only) or .safetensors")
    im.add_argument("--model", required=True, help="our model name (clip-b32, clip-b16, ...)")
    im.add_argument("--source", help="the open_clip model name of the file, e.g. ViT-B-32 or ViT-B-32-quickgelu")
    im.add_argument("--allow-partial", action="store_true", help="load even with missing or unexpected keys")
    im.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    from pipeline.interop import InteropError, export_open_clip, import_weights
    try:
        if args.command == "import":
            payload, report = import_weights(args.input, args.format, args.model, args.source, args.allow_partial)
            save_atomically(payload, Path(args.output))
            from pipeline.interop import describe
            print(f"keys: {describe(report)}\nwrote {args.output} ({args.model}, activation "
                  f"{payload['arch']['activation']})")
        elif args.format == "open_clip":
            name = export_open_clip(args.checkpoint, args.output)
            if name.startswith("local-dir:"):
                print(f"wrote {args.output}; load it with open_clip.create_model_and_transforms({name!r}); "
                      f"CLIP_benchmark: clip_benchmark eval --model {name} --pretrained '' ...")
            else:
                print(f"wrote {args.output}; load it with open_clip.create_model_and_transforms({name!r}, "
                      f"pretrained={args.output!r})")
        else:
            print(f"wrote {export(args.checkpoint, args.output, args.tag)}")
    except (InteropError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def save_atomically(payload: dict, output: Path):
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, output)


if __name__ == "__main__":
    sys.exit(main())
