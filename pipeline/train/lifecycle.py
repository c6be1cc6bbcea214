"""How a training process ends when something outside asks it to: a signal (SIGTERM from
a scheduler's preemption, Ctrl-C's SIGINT) or the death of the launcher that started it.
Either way the ranks agree on a step boundary, save there and stop (pipeline/train/trainer.py)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta

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


def collective_timeout(timeout_minutes: float) -> timedelta:
    """How long a collective may wait: the step deadline (train.timeout_minutes) plus a
    minute. Every rank's Heartbeat watchdog ends a hung step in one line at the deadline;
    a backend's timeout firing first (gloo raises, NCCL aborts) would end it with a
    traceback that does not say a peer is hung. Before the first step (rendezvous, loading a
    checkpoint) the collective timeout is what ends a wait, a minute later than the
    deadline."""
    return timedelta(minutes=timeout_minutes + 1)


class Heartbeat:
    """A hung rank must not hang the job (issue 34): a rank stopped by SIGSTOP, or stuck in
    a collective a peer never joins, makes no step. Each rank writes its last step to
    `<run dir>/heartbeat/rank<N>.json` (which rank reached which step, for a post-mortem:
    at most every WRITE_SECONDS, and at the end, since on a network filesystem a file
    written every step is a metadata operation every step), and a watchdog thread that
    reads the step from memory ends the process, non-zero and with one
    line, once no step has finished for `timeout_minutes` (train.timeout_minutes): the
    launcher (torchrun's agent, the deepspeed launcher) then ends the group, and torchrun
    with --max-restarts starts it again from the newest checkpoint (train.resume=auto).
    The backend's collective timeout, a minute later (collective_timeout), is the second
    line of defence; a backend that spins (a shared-memory all-reduce) never times out,
    hence the watchdog on every rank. Work between steps (an evaluation, a save) counts
    against the same deadline; `doing` names it, so that the line says what ran long."""

    WRITE_SECONDS = 5.0

    def __init__(self, run_dir, rank: int, timeout_minutes: float):
        from pathlib import Path
        self.path = Path(run_dir) / "heartbeat" / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.timeout = rank, timeout_minutes * 60
        self.step, self.last, self.written = 0, time.monotonic(), float("-inf")
        self.activity = ""  # what the rank does after its last step, when not stepping
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="heartbeat-watchdog", daemon=True).start()

    def beat(self, step: int):
        self.step, self.last, self.activity = step, time.monotonic(), ""
        if self.last - self.written >= self.WRITE_SECONDS:
            self._write()

    def doing(self, activity: str):
        """Work between two steps (e.g. "the evaluation at step 40"): the deadline still
        runs, and the watchdog's line names this work, not only a hung peer."""
        self.activity = activity

    def _write(self):
        import json
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "step": self.step, "time": time.time(), "pid": os.getpid()}))
        os.replace(tmp, self.path)
        self.written = time.monotonic()

    def stop(self):
        self.done.set()
        self._write()  # the last step, whenever the previous write was

    def _watch(self):
        # Wakes when the deadline of the last beat falls due, not on a period: the collective
        # a hung peer blocks began after that beat, so its own timeout (a margin later, see
        # collective_timeout) comes after this line; woken every timeout/4, the watchdog
        # lost that race to gloo's traceback in CI.
        while not self.done.wait(max(0.0, self.last + self.timeout - time.monotonic())):
            waited = time.monotonic() - self.last
            if waited >= self.timeout:
                then, cause = "", "a peer rank is hung or gone"
                if self.activity:  # an evaluation or a save ran long, or a peer hung during it
                    then = f", then {self.activity}"
                    cause = f"{self.activity} took longer (raise train.timeout_minutes), or {cause}"
                sys.stderr.write(f"error: rank {self.rank}: no step finished in {waited / 60:.1f} min (last step "
                                 f"{self.step}{then}), over train.timeout_minutes={self.timeout / 60:g}: {cause}; "
                                 f"exiting so that the launcher ends the group (torchrun --max-restarts restarts "
                                 f"it from the newest checkpoint)\n")
                sys.stderr.flush()
                os._exit(3)
