"""The job heals itself (issue 34): under the real torchrun agent with --max-restarts, a
rank that dies or hangs ends the group, the agent starts it again, and every restarted
rank resumes from the newest complete checkpoint (train.resume=auto) with no change to the
command, in the same MLflow run, tagged with the restart count."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT, free_port
from test_train_e2e import ds_config, jsonl, jsonl_so_far, run_config

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def elastic(config: Path, ds: Path, *overrides: str, restarts: int = 2) -> subprocess.Popen:
    """torchrun as a team runs it on one node: c10d rendezvous, restarts allowed."""
    return subprocess.Popen([TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", str(restarts),
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             "--rdzv-id", "recovery", "launch/train.py", "--deepspeed_config", str(ds), "--config",
                             str(config), "train.resume=auto", *overrides],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if any(r.get("step", 0) >= step and "loss" in r for r in jsonl_so_far(run_dir)):
            return
        time.sleep(0.3)
    raise TimeoutError(f"no step {step} in {timeout} s")


def worker_of_rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "launch/train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"rank {rank}'s worker not found")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """The agent's exit (0), its output kept in `log`."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.write_text(out)
    assert proc.returncode == 0, f"see {log}: " + out[-3000:]
    return out


def logged_twice_agree(run_dir: Path) -> dict[int, list[float]]:
    """Every step's logged losses (a step redone after a restart is logged again): a step
    redone from a checkpoint must repeat its loss bit for bit."""
    losses: dict[int, list[float]] = {}
    for r in jsonl(run_dir):
        if "loss" in r and "step" in r:
            losses.setdefault(r["step"], []).append(r["loss"])
    for step, values in losses.items():
        assert len(set(values)) == 1, (step, values)
    return losses


def mlflow_run(run_dir: Path, experiment: str = "e2e"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_a_killed_rank_then_a_hung_rank_are_restarted_by_torchrun_from_the_newest_checkpoint(tmp_path, demo_data):
    """kill -9 of one rank ended the job (a person restarted it). Now the agent restarts both
    ranks with the same command and they resume from the newest checkpoint. Then SIGSTOP on
    one rank: it makes no progress and the other waits in a collective; within
    train.timeout_minutes the waiting rank exits in one line, the agent ends the group (the
    stopped process too: nothing is left behind) and restarts it. The run finishes; every
    step redone repeats its loss exactly; one MLflow run, tagged restarts=2; the heartbeat
    files say which step each rank reached."""
    # 20 steps: the SIGSTOP must land before the last step (with 12, the few left after it
    # once ran out before the signal did)
    steps = 20
    config = run_config(tmp_path, demo_data, "healed", train={"steps": steps, "log_every": 1, "save_every": 2,
                                                               "timeout_minutes": 0.25})
    run_dir = tmp_path / "runs" / "healed"
    proc = elastic(config, ds_config(tmp_path))
    wait_for_step(run_dir, 3, proc)
    worker_of_rank(proc, 1).kill()
    deadline = time.time() + 300
    while not any(r.get("event") == "restart" for r in jsonl_so_far(run_dir)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    resumed_at = next(r["step"] for r in jsonl_so_far(run_dir) if r.get("event") == "restart")
    wait_for_step(run_dir, resumed_at + 3, proc)
    stopped = worker_of_rank(proc, 1)
    stopped.suspend()  # SIGSTOP
    out = finish(proc, tmp_path / "torchrun.log")
    assert "no step finished in" in out and "over train.timeout_minutes=0.25" in out, out[-3000:]
    assert not psutil.pid_exists(stopped.pid) or stopped.status() == psutil.STATUS_ZOMBIE
    losses = logged_twice_agree(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)) and any(len(v) == 2 for v in losses.values())
    restarts = [r for r in jsonl(run_dir) if r.get("event") == "restart"]
    assert [r["restarts"] for r in restarts] == [1, 2] and all(r["world_size"] == 2 for r in restarts), restarts
    assert "[train] restart 2: 2 ranks, resuming at step" in out
    run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "2"
    beats = {p.name: json.loads(p.read_text()) for p in (run_dir / "heartbeat").glob("rank*.json")}
    assert sorted(beats) == ["rank0.json", "rank1.json"] and all(b["step"] == steps for b in beats.values()), beats


def agent(config: Path, ds: Path, endpoint: str, name: str, log: Path, hosts: bool | None = None) -> subprocess.Popen:
    """One "node": a torchrun agent with one process, in docs/training.md's multi-node form (c10d
    rendezvous, 1 to 2 nodes, restarts allowed). Its output goes to `log`. `hosts=False`: the
    agent never hosts the rendezvous store, as on a node other than the endpoint's (on
    loopback every agent could take the freed port over and host it itself)."""
    conf = "last_call_timeout=5" + ("" if hosts is None else f",is_host={str(hosts).lower()}")
    return subprocess.Popen([TORCHRUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "nodes",
                             "--rdzv-conf", conf, "launch/train.py", "--deepspeed_config", str(ds),
                             "--config", str(config), "train.resume=auto"],
                            cwd=REPO_ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO", "AGENT": name})


def end_agents(*agents: subprocess.Popen):
    """Whatever of these agents still runs, with its workers (each in a session of its own)."""
    for proc in agents:
        if proc.poll() is None:
            for process in psutil.Process(proc.pid).children(recursive=True):
                process.kill()
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_lost_node_leaves_the_other_to_finish_alone_from_the_last_checkpoint(tmp_path, demo_data):
    """Two torchrun agents on loopback, one process each (two simulated nodes). kill -9 of
    the second node's worker: both restart and go on together. Then the second node's agent
    is killed: the first re-forms the group alone (--nnodes 1:2) and finishes
    at world size 1 from the newest checkpoint; every step redone on one process repeats the
    two-process loss bit for bit (the topology-free data order and arithmetic)."""
    config = run_config(tmp_path, demo_data, "nodes", train={"steps": 12, "log_every": 1, "save_every": 2})
    ds = ds_config(tmp_path)
    run_dir = tmp_path / "runs" / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    first = agent(config, ds, endpoint, "first", tmp_path / "first.log")  # hosts the rendezvous store
    time.sleep(1)
    second = agent(config, ds, endpoint, "second", tmp_path / "second.log")
    try:
        wait_for_step(run_dir, 3, first)
        worker_of_rank(second, 1).kill()  # one node's worker dies
        deadline = time.time() + 300
        while not any(r.get("event") == "restart" for r in jsonl_so_far(run_dir)):
            assert time.time() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        restarted_at = max(r["step"] for r in jsonl_so_far(run_dir) if r.get("event") == "restart")
        wait_for_step(run_dir, restarted_at + 2, first)
        # the second node's agent goes: its worker (in a session of its own, as torchrun starts
        # them) sees its launcher gone, stops at the next step with a checkpoint and exits 75
        # (a 0 told the first agent that the job was done: it ended at step 5 of 24)
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    losses = logged_twice_agree(run_dir)
    assert sorted(losses) == list(range(1, 13))
    restarts = [r for r in jsonl(run_dir) if r.get("event") == "restart"]
    assert [r["world_size"] for r in restarts][:1] == [2] and restarts[-1]["world_size"] == 1, restarts
    final = json.loads((run_dir / "checkpoints" / "step_00000012" / "COMPLETE.json").read_text())
    assert final["world_size"] == 1
    assert mlflow_run(run_dir).data.tags["restarts"] == str(restarts[-1]["restarts"])


def test_a_node_that_freezes_whole_is_left_behind_in_minutes_with_default_deadlines(tmp_path, demo_data):
    """Issue 44: an abrupt node loss (power, a kernel panic, a network partition) takes the
    agent and its workers at once and no TCP reset reaches the survivors: SIGSTOP of the
    second node's whole process group keeps its sockets open and silent. The first node's
    rank waited in a collective for train.timeout_minutes (30) before anything restarted.
    With the default step deadline (10 x the median step, at least a minute) its watchdog
    ends it in about a minute, its agent re-forms the group alone and the run finishes from
    the newest checkpoint. train.run_name is not given: under torchrun it is the rendezvous
    id, so train.resume=auto finds the checkpoints."""
    config = run_config(tmp_path, demo_data, "unused", train={"steps": 12, "log_every": 1, "save_every": 2,
                                                               "run_name": ""})
    ds = ds_config(tmp_path)
    run_dir = tmp_path / "runs" / "nodes"  # the rendezvous id agent() passes
    endpoint = f"127.0.0.1:{free_port()}"
    first = agent(config, ds, endpoint, "first", tmp_path / "first.log")  # hosts the rendezvous store
    time.sleep(1)
    second = agent(config, ds, endpoint, "second", tmp_path / "second.log")
    try:
        wait_for_step(run_dir, 7, first)  # past the warm-up steps: the deadline has adapted
        frozen_at = time.time()
        node = psutil.Process(second.pid)
        for process in [node, *node.children(recursive=True)]:  # the agent and its worker (a session of its own)
            process.suspend()
        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text()[-4000:]
        healed_in = time.time() - frozen_at
    finally:
        end_agents(first, second)
    out = (tmp_path / "first.log").read_text()
    assert "no step finished in" in out and re.search(r"over the step deadline of \d+ s \(10 x the median step", out), \
        out[-3000:]
    print(f"frozen node left behind, run finished {healed_in:.0f} s after the freeze")
    assert healed_in < 300, healed_in  # was train.timeout_minutes (30 min) before anything restarted
    losses = logged_twice_agree(run_dir)
    assert sorted(losses) == list(range(1, 13))
    restarts = [r for r in jsonl(run_dir) if r.get("event") == "restart"]
    assert restarts and restarts[-1]["world_size"] == 1, restarts


def test_losing_the_rendezvous_node_ends_the_others_in_seconds_with_one_line_and_a_checkpoint(tmp_path, demo_data):
    """Issue 44: the node that hosts the c10d rendezvous store (node 0, the --rdzv-endpoint)
    is lost: the other nodes cannot re-form a group (docs/training.md says how to survive
    it: a requeue, or a rendezvous endpoint off the training nodes). What they must do is
    end, soon and legibly, with a checkpoint a requeued job resumes from: the survivor's
    rank ends with one line naming the lost peer, its agent ends (non-zero: the job is not
    done), no process is left behind, all within a bound."""
    config = run_config(tmp_path, demo_data, "unused", train={"steps": 40, "log_every": 1, "save_every": 2,
                                                               "run_name": ""})
    ds = ds_config(tmp_path)
    run_dir = tmp_path / "runs" / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    first = agent(config, ds, endpoint, "first", tmp_path / "first.log", hosts=True)
    time.sleep(1)
    second = agent(config, ds, endpoint, "second", tmp_path / "second.log", hosts=False)
    try:
        wait_for_step(run_dir, 5, first)
        node = psutil.Process(first.pid)
        survivors = psutil.Process(second.pid).children(recursive=True)
        lost_at = time.time()
        for process in [node, *node.children(recursive=True)]:  # the node goes: its agent, store and worker
            process.kill()
        rc = second.wait(timeout=300)
        ended_in = time.time() - lost_at
        psutil.wait_procs(survivors, timeout=30)
        left = [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        end_agents(first, second)
    out = (tmp_path / "second.log").read_text()
    print(f"the rendezvous node lost: the other node ended in {ended_in:.0f} s (rc {rc})")
    assert rc != 0 and not left, (rc, left)
    assert ended_in < 120, ended_in  # not a rendezvous join_timeout (600 s) or train.timeout_minutes
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: rank 1: a collective at step \d+ failed because a peer rank "
                                         r"ended or cannot be reached", errors[0]), out[-3000:]
    complete = sorted(run_dir.glob("checkpoints/step_*/COMPLETE.json"))
    assert complete and json.loads(complete[-1].read_text())["step"] >= 4  # what a requeued job resumes from
