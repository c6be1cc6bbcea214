"""Checkpoint write time per model size: what `train.save_every` costs, to choose it
(docs/training.md, "Failures: what heals itself").

    python -m bench.bench_checkpoint [--models clip-tiny,clip-b32,clip-b16] [--ds ds_configs/cpu_fp32.json]
                                     [--repeats 3] [--out DIR]

One process (the deepspeed engine on this machine's accelerator, a 1-rank gloo group),
the trainer's own save (`pipeline.weights.checkpoint.save`: DeepSpeed's model and optimizer states,
the train state, checksums, the COMPLETE marker) into --out (default: a temporary folder on
the same disk as the runs), best of --repeats. Prints seconds per save, the bytes written
and the write rate per model. With N ranks each writes its ZeRO partition (1/N of the
optimizer state) at once, so the time per save shrinks with the ranks while the disk keeps
up.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.cli import command_line


def save_seconds(model_name: str, ds_path: str, out: Path, repeats: int) -> dict:
    import deepspeed
    import torch

    from pipeline.weights import checkpoint
    from pipeline.config import ObjectiveConfig, OptimConfig, TrainConfig
    from pipeline.train.ds_config import fill_ds_config, read_ds_config
    from pipeline.train.engine import param_groups
    from pipeline.model import build_model
    from pipeline.objectives import ComposedObjective, TrainModule
    torch.manual_seed(0)
    model = build_model(model_name)
    module = TrainModule(model, ComposedObjective(ObjectiveConfig(), model.arch))
    optim = OptimConfig()
    ds = fill_ds_config(read_ds_config(ds_path), TrainConfig(global_batch_size=1, micro_batch_size=1), optim, 1)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, optim), config=ds)
    best, written = float("inf"), 0
    for i in range(repeats):
        folder = out / f"{model_name}-{i}"
        start = time.perf_counter()
        tag_dir = checkpoint.save(engine, folder, checkpoint.TrainState(step=i + 1), keep_last=1)
        best = min(best, time.perf_counter() - start)
        written = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())
        shutil.rmtree(folder)
    params = sum(p.numel() for p in module.parameters())
    return {"model": model_name, "params": params, "seconds": best, "bytes": written, "mb_per_s": written / best / 1e6}


def main(argv=None) -> list[dict]:
    parser = command_line("python -m bench.bench_checkpoint", __doc__)
    parser.add_argument("--models", default="clip-tiny,clip-b32,clip-b16", help="comma-separated model names")
    parser.add_argument("--ds", default="ds_configs/cpu_fp32.json", help="the DeepSpeed config the engine uses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from launch.demo import free_port
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    deepspeed.init_distributed()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-checkpoint-"))
    results = [save_seconds(m, args.ds, out, args.repeats) for m in args.models.split(",")]
    print(f"checkpoint saves ({args.ds}, one process, best of {args.repeats}, into {out}):")
    print(f"{'model':<14}{'params':>14}{'MB written':>12}{'s / save':>10}{'MB/s':>8}")
    for r in results:
        print(f"{r['model']:<14}{r['params']:>14,}{r['bytes'] / 1e6:>12,.0f}{r['seconds']:>10.2f}{r['mb_per_s']:>8,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
