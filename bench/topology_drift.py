"""How far one run's losses and gradient norms part between topologies: the same config
(msclip-s-tiny on the demo shards, global batch 32) launched through the deepspeed launcher
on each number of processes, exact accumulation making up the rest; per-step relative gaps
against the first. Not a timing: docs/training.md ("Changing the number of GPUs mid-run") quotes it.

    python -m bench.topology_drift [--processes 4,2,1] [--micro 8] [--steps 20]

With two virtual ranks (--processes 2,1 --micro 16) every gap is 0 (tests/test_elastic.py
asserts it); with more, the all-reduces add the ranks' terms in another order than one
process adds its micro-batches, and Adam amplifies the last bits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from data_prep.demo import demo_location
from launch.demo import free_port
from pipeline.cli import command_line

REPO_ROOT = Path(__file__).resolve().parents[1]


def launch(workdir: Path, name: str, processes: int, micro: int, steps: int, shards: str) -> dict[int, tuple]:
    cfg = {"model": {"name": "msclip-s-tiny"},
           "data": {"train_shards": shards, "workers": 1, "shuffle_buffer": 400, "readers": 4},
           "optim": {"lr": 5.0e-4, "warmup_steps": 10, "weight_decay": 0.1, "shared_weight_decay": 0.2},
           "train": {"global_batch_size": 32, "micro_batch_size": micro, "steps": steps, "log_every": 1,
                     "output_dir": str(workdir / "runs"), "run_name": name}}
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    subprocess.run([deepspeed, "--num_gpus", str(processes), "--master_port", str(free_port()), "launch/train.py",
                    "--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"), "--config", str(config)],
                   cwd=REPO_ROOT, check=True, capture_output=True, env=os.environ)
    records = [json.loads(line) for line in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "step" in r and "loss" in r}


def main(argv=None):
    parser = command_line("python -m bench.topology_drift", __doc__, notes=False)
    parser.add_argument("--processes", default="4,2,1")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--demo", default=str(demo_location()),
                        help="the demo dataset (default: MSCLIP_DEMO_DATA, else data/demo of the checkout)")
    args = parser.parse_args(argv)
    shards = f"{args.demo}/shards/digits::{args.demo}/shards/photos"
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: launch(Path(tmp), f"p{p}", int(p), args.micro, args.steps, shards)
                for p in args.processes.split(",")}
    (first, reference), *others = runs.items()
    for processes, metrics in others:
        for index, what in enumerate(("loss", "grad_norm")):
            gaps = [abs(metrics[s][index] - reference[s][index]) / abs(reference[s][index]) for s in sorted(reference)]
            print(f"{processes} vs {first} processes, {what} relative gap by step: "
                  + " ".join(f"{gap:.1e}" for gap in gaps))


if __name__ == "__main__":
    main()
