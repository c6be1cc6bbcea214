"""How often a group restarted by torchrun's agent comes back, with and without the fresh
store per start (pipeline.ranks.init_process_group).

    python -m bench.torchrun_restarts [--tries 3]

Each try runs torchrun (c10d rendezvous, 2 processes, --max-restarts 1) over a tiny
worker: init the process group, one all-reduce, rank 1 of the first attempt exits 1, and
the restarted group does two all-reduces. "plain" inits the group the default way
(torch.distributed.init_process_group on the agent's store), "fresh" through
pipeline.ranks.init_process_group. Prints, per way, how many tries the restarted group
finished (a try is stopped after 120 s: a hang counts as a failure).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.cli import command_line

WORKER = '''
import datetime, os, sys, time
import torch, torch.distributed as dist
from pipeline.ranks import init_process_group
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
timeout = datetime.timedelta(seconds=60)
if sys.argv[1] == "fresh":
    init_process_group(timeout)
else:
    dist.init_process_group("gloo", timeout=timeout)
t = torch.ones(1)
dist.all_reduce(t)
if attempt == 0 and dist.get_rank() == 1:
    time.sleep(1)
    os._exit(1)
time.sleep(2)
dist.all_reduce(t)
print(f"restarted group finished: rank {dist.get_rank()}", flush=True)
'''


def main(argv=None) -> dict:
    parser = command_line("python -m bench.torchrun_restarts", __doc__)
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args(argv)
    from launch.demo import free_port
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    finished = {}
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        for way in ("plain", "fresh"):
            finished[way] = 0
            for _ in range(args.tries):
                try:
                    done = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
                                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                                           str(worker), way], capture_output=True, text=True, timeout=120,
                                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
                    finished[way] += done.returncode == 0 and done.stdout.count("restarted group finished") == 2
                except subprocess.TimeoutExpired:
                    pass
    for way, n in finished.items():
        print(f"{way}: the restarted group finished in {n} of {args.tries} tries")
    return finished


if __name__ == "__main__":
    main()
