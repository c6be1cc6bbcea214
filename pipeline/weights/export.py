"""A run's checkpoint as one file for evaluation: consolidated fp32 weights plus what it
takes to rebuild the model, loadable with torch.load(weights_only=True); and the model of
such a file (an export, or a payload pipeline/weights/interop.py just imported)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.weights.checkpoint import safe_torch_load
from pipeline.weights.files import COMPLETE, complete_tags

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


def save_atomically(payload: dict, output: Path):
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, output)
