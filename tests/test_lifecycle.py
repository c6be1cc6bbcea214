"""How a rank takes signals (pipeline/lifecycle.py), in a child interpreter so that a
signal that ends the process ends the child, not pytest."""
import signal
import subprocess
import sys

from conftest import REPO_ROOT

CHILD = """
import os, signal, time
from pipeline.lifecycle import StopRequest
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

    from pipeline.lifecycle import Heartbeat
    heartbeat = Heartbeat(tmp_path, 3, timeout_minutes=60)
    beats = tmp_path / "heartbeat" / "rank3.json"
    for step in range(1, 101):  # far faster than Heartbeat.WRITE_SECONDS
        heartbeat.beat(step)
    assert json.loads(beats.read_text())["step"] == 1  # the first beat only
    heartbeat.stop()
    assert json.loads(beats.read_text())["step"] == 100
