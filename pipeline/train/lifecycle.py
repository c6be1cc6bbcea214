"""How a training process ends when something outside asks it to: a signal (SIGTERM from
a scheduler's preemption, Ctrl-C's SIGINT) or the death of the launcher that started it.
Either way the ranks agree on a step boundary, save there and stop (pipeline/train/trainer.py)."""
from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
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
    """How long a collective may wait: the deadline (train.timeout_minutes) plus a minute.
    Every rank's Heartbeat watchdog ends a hung step in one line at the deadline; a
    backend's timeout firing first (gloo raises, NCCL aborts) would end it with a traceback
    that does not say a peer is hung. Before the first step (rendezvous, loading a
    checkpoint) the collective timeout is what ends a wait, a minute later than the
    deadline; once the step deadline has adapted, the collective timeout follows it
    (Heartbeat's on_deadline)."""
    return timedelta(minutes=timeout_minutes + 1)


class Heartbeat:
    """A hung rank must not hang the job (issue 34), and a lost one must not hold it for
    half an hour (issue 44): a rank stopped by SIGSTOP, a node that lost its power or its
    network (no TCP reset reaches the survivors), a collective a peer never joins: no step
    finishes. Each rank writes its last step to `<run dir>/heartbeat/rank<N>.json` (which
    rank reached which step, for a post-mortem: at most every WRITE_SECONDS, and at the
    end, since on a network filesystem a file written every step is a metadata operation
    every step), and a watchdog thread that reads the step from memory ends the process,
    non-zero and with one line, once no step has finished by the deadline: the launcher
    (torchrun's agent, the deepspeed launcher) then ends the group, and torchrun with
    --max-restarts starts it again from the newest checkpoint (train.resume=auto).

    The deadline adapts. For the first WARMUP_STEPS steps of a start (compilation, the first
    batches, a resume's fast-forward) and during work between steps that `doing` names (an
    evaluation, a save) it is train.timeout_minutes (30). After them a step gets
    STEP_FACTOR x the median of the steps measured so far, at least `floor_seconds` (a
    minute, or the data's read budget when shards are remote: one shard's timeouts and
    retries must not look like a lost peer), at most train.timeout_minutes;
    train.step_timeout_minutes fixes it instead. So a lost node is seen in about a minute
    on a model whose steps take a second, and a slow model is not cut short. torchtitan's
    default for a training collective is 100 s. The backend's collective timeout follows
    the deadline (`on_deadline`) as the second line of defence; a backend that spins (a
    shared-memory all-reduce) never times out, hence the watchdog on every rank."""

    WRITE_SECONDS = 5.0
    WARMUP_STEPS = 5
    STEP_FACTOR = 10.0
    MIN_FLOOR_SECONDS = 60.0

    def __init__(self, run_dir, rank: int, timeout_minutes: float, step_timeout_minutes: float | None = None,
                 floor_seconds: float = 0.0, on_deadline=None):
        from pathlib import Path
        self.path = Path(run_dir) / "heartbeat" / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.ceiling = rank, float(timeout_minutes) * 60
        self.fixed = step_timeout_minutes * 60 if step_timeout_minutes else None
        self.floor = max(self.MIN_FLOOR_SECONDS, floor_seconds)
        self.on_deadline = on_deadline  # called with the new deadline (s), from the training thread
        self.timeout = self.ceiling  # the deadline now
        self.durations: deque[float] = deque(maxlen=200)  # recent steps' seconds, work between them excluded
        self.step, self.last, self.written = 0, time.monotonic(), float("-inf")  # last: when the wait began
        self.step_start = None  # when the step under way began, if it is to be timed
        self.activity = ""  # what the rank does after its last step, when not stepping
        self.done, self.wake = threading.Event(), threading.Event()
        threading.Thread(target=self._watch, name="heartbeat-watchdog", daemon=True).start()

    def beat(self, step: int):
        now = time.monotonic()
        if self.step_start is not None:
            self.durations.append(now - self.step_start)
        self.step, self.last, self.step_start, self.activity = step, now, now, ""
        self._set_deadline(self.step_deadline())
        if self.last - self.written >= self.WRITE_SECONDS:
            self._write()

    def doing(self, activity: str) -> "_Activity":
        """Work between two steps (e.g. "the evaluation at step 40"): it gets
        train.timeout_minutes, not the step deadline, and the watchdog's line names it. Used
        as a context (`with heartbeat.doing(...):`), its end starts the next step's clock."""
        self.activity, self.step_start = activity, None
        self._set_deadline(self.ceiling)
        return _Activity(self)

    def _activity_over(self):
        now = time.monotonic()
        self.last, self.step_start, self.activity = now, now, ""
        self._set_deadline(self.step_deadline())

    def step_deadline(self) -> float:
        if len(self.durations) < self.WARMUP_STEPS:
            return self.ceiling
        if self.fixed:
            return self.fixed
        return min(self.ceiling, max(self.floor, self.STEP_FACTOR * statistics.median(self.durations)))

    def _set_deadline(self, seconds: float):
        if seconds == self.timeout:
            return
        self.timeout = seconds
        self.wake.set()  # a shorter deadline: the watchdog must not sleep past it
        if self.on_deadline:
            self.on_deadline(seconds)

    def _write(self):
        """Best effort: the file is a post-mortem record, so a full or vanished filesystem
        must neither stop training nor hide the error that matters (a checkpoint save that
        ran out of space ends the loop, and this write in its `finally` would replace that
        one line with a traceback)."""
        import json
        self.written = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"rank": self.rank, "step": self.step, "time": time.time(), "pid": os.getpid(),
                                       "deadline_seconds": round(self.timeout, 1)}))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def stop(self):
        self.done.set()
        self.wake.set()
        self._write()  # the last step, whenever the previous write was

    def _deadline_words(self) -> str:
        if self.timeout == self.ceiling:
            return f"train.timeout_minutes={self.ceiling / 60:g}"
        if self.fixed:
            return f"train.step_timeout_minutes={self.fixed / 60:g}"
        return (f"the step deadline of {self.timeout:.0f} s ({self.STEP_FACTOR:g} x the median step of "
                f"{statistics.median(self.durations):.2f} s, at least {self.floor:.0f} s; "
                f"train.step_timeout_minutes sets it)")

    def _watch(self):
        # Wakes when the deadline of the last beat falls due, not on a period: the collective
        # a hung peer blocks began after that beat, so its own timeout (a margin later, see
        # collective_timeout) comes after this line; woken every timeout/4, the watchdog
        # lost that race to gloo's traceback in CI. A deadline made shorter wakes it too.
        while not self.done.is_set():
            self.wake.wait(max(0.0, self.last + self.timeout - time.monotonic()))
            self.wake.clear()
            if self.done.is_set():
                return
            waited = time.monotonic() - self.last
            if waited >= self.timeout:
                then, cause = "", "a peer rank is hung or gone"
                if self.activity:  # an evaluation or a save ran long, or a peer hung during it
                    then = f", then {self.activity}"
                    cause = f"{self.activity} took longer (raise train.timeout_minutes), or {cause}"
                sys.stderr.write(f"error: rank {self.rank}: no step finished in {waited / 60:.1f} min (last step "
                                 f"{self.step}{then}), over {self._deadline_words()}: {cause}; exiting so that the "
                                 f"launcher ends the group (torchrun --max-restarts restarts it from the newest "
                                 f"checkpoint)\n")
                sys.stderr.flush()
                os._exit(3)


class _Activity:
    """The end of a Heartbeat's work between steps, as a context manager."""

    def __init__(self, heartbeat: Heartbeat):
        self.heartbeat = heartbeat

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.heartbeat._activity_over()
