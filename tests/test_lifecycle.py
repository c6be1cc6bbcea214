"""How a rank takes signals (pipeline/train/lifecycle.py), in a child interpreter so that a
signal that ends the process ends the child, not pytest."""
import os
import signal
import subprocess
import sys

from conftest import REPO_ROOT

CHILD = """
import os, signal, time
from pipeline.train.lifecycle import StopRequest
stop = StopRequest()
for name in {names!r}:
    os.kill(os.getpid(), getattr(signal, name))
    time.sleep(0.2)  # the handler runs between the signals, as when a launcher forwards one late
print("alive; stop requested by", stop.received)
"""


def run_child(*names):
    return subprocess.run([sys.executable, "-c", CHILD.format(names=names)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_a_forwarded_second_sigterm_is_the_same_request_not_the_end():
    """SLURM signals every process of the step and the deepspeed launcher forwards its own
    SIGTERM: a rank that died at the second one lost its checkpoint (CI, issue 22)."""
    child = run_child("SIGTERM", "SIGTERM", "SIGTERM")
    assert child.returncode == 0, child.stderr
    assert "stop requested by SIGTERM" in child.stdout


def test_ctrl_c_then_the_launchers_sigterm_stop_at_a_step_but_a_second_ctrl_c_ends_at_once():
    child = run_child("SIGINT", "SIGTERM")
    assert child.returncode == 0, child.stderr
    assert "stop requested by SIGINT" in child.stdout
    assert run_child("SIGINT", "SIGINT").returncode == -signal.SIGINT


def test_the_heartbeat_file_is_written_every_few_seconds_and_at_the_end_not_every_step(tmp_path):
    import json

    from pipeline.train.lifecycle import Heartbeat
    heartbeat = Heartbeat(tmp_path, 3, timeout_minutes=60)
    beats = tmp_path / "heartbeat" / "rank3.json"
    for step in range(1, 101):  # far faster than Heartbeat.WRITE_SECONDS
        heartbeat.beat(step)
    assert json.loads(beats.read_text())["step"] == 1  # the first beat only
    heartbeat.stop()
    assert json.loads(beats.read_text())["step"] == 100


HUNG_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from pipeline.train.lifecycle import Heartbeat, collective_timeout
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=collective_timeout({minutes}))
if rank == 1:
    time.sleep(60)  # hung: never joins the step's collective
heartbeat = Heartbeat(sys.argv[1], rank, {minutes})
time.sleep(0.1)  # a step
heartbeat.beat(1)
dist.all_reduce(torch.ones(1))  # the next step's collective, which the peer never joins
print("the collective returned")
"""


def test_a_rank_waiting_on_a_hung_peer_ends_in_the_watchdogs_line_not_the_backends_traceback(tmp_path):
    """The step deadline (train.timeout_minutes) must be what ends a rank whose peer hangs:
    gloo's own timeout, firing first, ended it with a traceback that never says a peer is
    hung, and the restart test read no line (CI). The collective began after the last
    beat, so the watchdog, woken at that beat's deadline, speaks first."""
    from conftest import free_port
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO_ROOT)}
    script = HUNG_PEER.format(minutes=0.02)  # a 1.2 s deadline
    hung, waiting = (subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT,
                                      env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for rank in (1, 0))
    try:
        out, err = waiting.communicate(timeout=120)
    finally:
        hung.kill()
        hung.communicate()
    assert waiting.returncode == 3, err
    assert "error: rank 0: no step finished in" in err and "Traceback" not in err, err
    assert "over train.timeout_minutes=0.02" in err and "the collective returned" not in out


LONG_BETWEEN_STEPS = """
import sys, time
from pipeline.train.lifecycle import Heartbeat
heartbeat = Heartbeat(sys.argv[1], 0, 0.01)  # a 0.6 s deadline
heartbeat.beat(7)
heartbeat.doing("the evaluation at step 7 (eval.every_steps)")
if sys.argv[2] == "stepped":
    heartbeat.beat(8)  # the next step began and finished: the evaluation is over
time.sleep(30)  # an evaluation, or the next step, that never ends
"""


def test_the_watchdogs_line_names_the_work_between_steps_that_ran_past_the_deadline(tmp_path):
    """An evaluation during training (a suite on rank 0) or a save counts against the step
    deadline: the line must say that this work ran long, not only blame a hung peer; once
    the next step finished, the work is over and the line does not name it."""
    children = {case: subprocess.Popen([sys.executable, "-c", LONG_BETWEEN_STEPS, str(tmp_path / case), case],
                                       cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
                for case in ("evaluating", "stepped")}
    errors = {case: child.communicate(timeout=60)[1] for case, child in children.items()}
    assert all(child.returncode == 3 for child in children.values()), errors
    assert ("(last step 7, then the evaluation at step 7 (eval.every_steps)), over "
            "train.timeout_minutes=0.01: the evaluation at step 7 (eval.every_steps) took longer (raise "
            "train.timeout_minutes), or a peer rank is hung or gone;") in errors["evaluating"], errors
    assert "(last step 8), over train.timeout_minutes=0.01: a peer rank is hung or gone;" in errors["stepped"], errors


ADAPTIVE = """
import sys, time
from pipeline.train.lifecycle import Heartbeat
Heartbeat.MIN_FLOOR_SECONDS = 1.0  # a minute in a run
seen = []
heartbeat = Heartbeat(sys.argv[1], 0, timeout_minutes=5, on_deadline=seen.append)
for step in range(1, 10):  # the warm-up steps, then steps timed at ~0.05 s
    time.sleep(0.05)
    heartbeat.beat(step)
print("adapted", heartbeat.timeout, seen, flush=True)
heartbeat.doing("the evaluation at step 9")
time.sleep(1.5)  # longer than the step deadline: work between steps gets train.timeout_minutes
heartbeat.beat(10)
print("after the evaluation", heartbeat.timeout, seen, flush=True)
time.sleep(30)  # then a peer is lost
"""


def test_the_step_deadline_adapts_to_the_measured_steps_and_work_between_steps_keeps_the_long_one(tmp_path):
    """Issue 44: a lost peer held every rank for train.timeout_minutes (30). After the
    warm-up steps the deadline is 10 x the median step, at least the floor (a minute in a
    run, a second here), and the backend's collective timeout follows it (on_deadline); an
    evaluation between steps still gets the long deadline, and the next step the short one."""
    import time
    start = time.monotonic()
    child = subprocess.run([sys.executable, "-c", ADAPTIVE, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 3, child.stderr
    assert child.stdout.splitlines() == ["adapted 1.0 [1.0]", "after the evaluation 1.0 [1.0, 300.0, 1.0]"]
    assert "(last step 10), over the step deadline of 1 s (10 x the median step of 0.05 s, at least 1 s;" \
           in child.stderr, child.stderr
    assert time.monotonic() - start < 10


PEER_ENDS = """
import os, sys
import torch, torch.distributed as dist
from datetime import timedelta
from pipeline.train.trainer import peer_failure
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
dist.barrier()
if rank == 1:
    sys.stderr.write("error: rank 1 ends (its own one line)\\\\n")
    os._exit(1)
try:
    dist.all_reduce(torch.ones(1))  # the peer is gone: its socket closes under this collective
except Exception as e:
    print("peer failure" if peer_failure(e) else f"not recognized: {type(e).__name__}: {e}")
"""


def test_a_collective_left_by_a_peer_that_ended_is_told_from_other_errors(tmp_path):
    """Issue 44: a rank whose peer ended (that peer's one line said why) died in the
    backend's traceback, which buried the cause; the trainer tells that failure apart (the
    real gloo error of a real peer's exit) and ends in one line. A plain error is not one."""
    from conftest import free_port
    from pipeline.train.trainer import peer_failure
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", PEER_ENDS], cwd=REPO_ROOT, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out = [p.communicate(timeout=120) for p in procs]
    assert out[0][0].strip() == "peer failure", out
    assert not peer_failure(RuntimeError("CUDA out of memory")) and not peer_failure(ValueError("x"))
