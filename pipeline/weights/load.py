"""Any set of weights the project evaluates or scores with, as a model: our export, a
run's DeepSpeed checkpoints/ folder, or released weights imported on the fly. Shared by
`python -m eval` (and its suites) and `python -m data_prep.curate`."""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.weights.export import export, load_exported, model_from_payload
from pipeline.weights.interop import import_weights


def load_checkpoint(path: str, fmt: str = "ours", model_name: str | None = None, source: str | None = None):
    """(model, payload): our export or a run's checkpoints/; with `fmt` msclip/openai/open_clip,
    a released file imported on the fly (pipeline/weights/interop.py)."""
    if fmt != "ours":
        if not model_name:
            raise FileNotFoundError(f"--format {fmt}: name the model to build with --model (e.g. msclip-s-b32)")
        payload, _ = import_weights(path, fmt, model_name, source)
        return model_from_payload(payload), payload
    path = Path(path)
    if path.is_dir():  # a DeepSpeed checkpoints/ directory: consolidate first
        tmp = Path(tempfile.mkdtemp()) / "model.pt"
        export(path, tmp)
        path = tmp
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    return load_exported(path)
