"""The main job, on this machine's CPU with nothing downloaded: build the demo shards
with the real img2dataset, train the CLIP baseline and MS-CLIP-S (tiny) with the real
deepspeed launcher on 2 processes, evaluate both, compare them in MLflow.

    bash launch/demo.sh [--steps 400] [--workdir .] [--variants clip-tiny msclip-s-tiny] \
        [--set optim.lr=1e-3 ...]

Every stage is the command a user would type; each is printed before it runs.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import command_line

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], stage: str):
    print(f"\n== {stage}\n$ {shlex.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd, cwd=REPO_ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: {stage} failed (exit {result.returncode}); the command is printed above")
    print(f"== {stage}: done in {time.time() - started:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = command_line("bash launch/demo.sh", __doc__, notes=False)
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (global batch 64)")
    parser.add_argument("--workdir", default=".", help="where data/demo and runs/ go")
    parser.add_argument("--variants", nargs="+", default=["clip-tiny", "msclip-s-tiny"])
    parser.add_argument("--procs", type=int, default=2, help="training processes (deepspeed --num_gpus)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant's training (e.g. the learning-rate sweep of docs/sweeps.md)")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    data, runs = work / "data" / "demo", work / "runs"
    python = sys.executable
    started = time.time()

    if not (data / "shards" / "photos" / "manifest.yaml").is_file():
        run([python, "-m", "data_prep.demo", "--output", str(data)], "demo data: img2dataset from a loopback server")
    else:
        print(f"== demo data: reusing {data}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # the demo's own store, whatever MLFLOW_TRACKING_URI says: train, eval and compare read it
    store = f"sqlite:///{runs / 'mlflow.db'}"
    digits = str(data / "eval" / "digits")
    names = []
    for variant in args.variants:
        name = f"demo-{variant}-{stamp}"
        names.append(name)
        # Variants without a demo recipe of their own train with the baseline's settings.
        recipe = f"launch/recipes/demo-{variant}.yaml"
        extra = [] if (REPO_ROOT / recipe).is_file() else [f"model.name={variant}"]
        recipe = recipe if not extra else "launch/recipes/demo-clip-tiny.yaml"
        run([str(Path(python).with_name("deepspeed")), "--num_gpus", str(args.procs), "--master_port", str(free_port()),
             "launch/train.py", "--deepspeed_config", "ds_configs/cpu_fp32.json", "--config", recipe, *extra, *args.set,
             f"train.steps={args.steps}", f"train.run_name={name}", f"train.output_dir={runs}",
             f"tracking.tracking_uri={store}",
             f"data.train_shards={data}/shards/digits::{data}/shards/photos", f"eval.dataset={digits}",
             f"eval.every_steps={max(args.steps // 4, 1)}"], f"train {variant}")
        run([python, "-m", "eval", "--checkpoint", str(runs / name / "model.pt"), "--zeroshot", digits,
             "--linear-probe", digits, "--training-run", "--tracking-uri", store], f"evaluate {variant}")
    run([python, "-m", "eval.compare", "--experiment", EXPERIMENT, "--runs", *names,
         "--tracking-uri", store, "--csv", str(runs / f"comparison-{stamp}.csv")],
        "compare")
    # mlflow ui is MLflow's own command: it sends telemetry unless told not to (pipeline/cli.py)
    quiet = "" if os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "false" else "MLFLOW_DISABLE_TELEMETRY=true "
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min. Look at the runs with:\n"
          f"  {quiet}{Path(python).with_name('mlflow')} ui --backend-store-uri sqlite:///{runs / 'mlflow.db'}\n"
          f"and open the page `eval.compare` printed above (experiment '{EXPERIMENT}', the model-training view), "
          f"select both runs, Compare.", flush=True)
    if data != REPO_ROOT / "data" / "demo":  # the bench tools look in the checkout unless told
        print(f"The bench tools find this demo data with: export MSCLIP_DEMO_DATA={data}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
