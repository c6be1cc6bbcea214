"""How a training process ends when something outside asks it to: a signal (SIGTERM from
a scheduler's preemption, Ctrl-C's SIGINT) or the death of the launcher that started it.
Either way the ranks agree on a step boundary, save there and stop (pipeline/trainer.py)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

LAUNCHERS = ("deepspeed", "torch.distributed.run", "torchrun")


class Preempted(Exception):
    def __init__(self, reason: str, step: int):
        super().__init__(f"{reason} at step {step}")
        self.reason, self.step = reason, step


class StopRequest:
    """SIGTERM (SLURM's preemption, most schedulers' grace period) and SIGINT ask the run
    to stop at the next step boundary with a checkpoint, instead of dying mid-step and
    losing everything since the last save. Ranks agree through a one-element all-reduce
    per step (a launcher may signal them one at a time), so all of them save the same step.

    Repeated SIGTERMs are one request: SLURM signals every process of the job step and the
    deepspeed launcher (launch.py) then forwards its own SIGTERM to each rank, so every
    rank sees two within a second (ending at the second one lost the checkpoint in CI);
    the sender's escalation is SIGKILL after its grace period. A second SIGINT ends the
    process at once: that is an operator pressing Ctrl-C again (a run stuck before its
    first step can still be interrupted)."""

    def __init__(self):
        self.received = ""  # the first reason to stop, for the log and the MLflow run
        self.signals: set[int] = set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        if signum == signal.SIGINT and signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signals.add(signum)
        self.request(signal.Signals(signum).name)

    def request(self, reason: str):
        self.received = self.received or reason

    def agreed(self, device) -> bool:
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def stop_with_launcher(stop: StopRequest, poll_seconds: float = 1.0, grace_seconds: float = 30.0):
    """Stop this rank soon after its launcher's death. A scheduler or an operator that
    SIGKILLs the `deepspeed` process leaves its ranks running without a parent (they
    trained on, checkpointed and exported for 25 s in issue 22); no signal reaches them.
    A daemon thread watches every launcher process above this rank (the deepspeed runner
    and its per-node launch.py, or torchrun; not SLURM's srun, which signals its steps
    itself). When one is gone the rank stops as on SIGTERM (a checkpoint at the next step
    boundary), and exits outright after `grace_seconds` if that never comes (a peer stuck
    or gone), as DeepSpeed's own launcher kills 30 s after its SIGTERM."""
    import psutil
    watched, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            if not any(name in " ".join(proc.cmdline()) for name in LAUNCHERS):
                break
        except psutil.Error:
            break
        watched.append(proc)
        proc = proc.parent()

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch():
        while all(alive(p) for p in watched):
            time.sleep(poll_seconds)
        gone = next(p for p in watched if not alive(p))
        print(f"error: the launcher (pid {gone.pid}) is gone; this rank (pid {os.getpid()}) stops at the next "
              f"step", file=sys.stderr, flush=True)
        stop.request("the launcher's death")
        time.sleep(grace_seconds)
        print(f"error: no step boundary within {grace_seconds:.0f} s of the launcher's death; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    if watched:
        threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
