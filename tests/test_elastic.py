"""Issue 17 through the real launcher: the same run on any topology, and a resume on
another number of processes or another ZeRO stage (DeepSpeed's universal checkpoint)."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from test_train_e2e import batch_digests, ds_config, jsonl, launch, launcher_cmd, run_config

pytestmark = pytest.mark.slow

STEPS = 10
MOVE = 5  # the step whose checkpoint is resumed on another topology
# One process with exact accumulation scores each micro-batch as the rank of a 2-process run
# holding those samples would (pipeline/train/engine.py, exact_accumulation_step), and the gradient
# norm that clipping divides by is summed the same on both (engine.topology_free_grad_norm):
# every loss and every grad norm is then the same number, bit for bit, on 1 or 2 processes,
# at any step and across moves. Either fix alone leaves a drift that Adam amplifies: without
# the per-rank scoring 1e-7 at step 2 and up to 2.5e-4 by step 20, without the norm 3.4e-6
# by step 20 (2026-11-30): under the 1e-5, so this compares exactly.


def elastic_config(tmp_path, demo_data, name, workers=1, **train):
    # 4 virtual readers: 2 per rank on 2 processes, so that 2 loader workers each have one
    return run_config(tmp_path, demo_data, name, data={"readers": 4, "workers": workers},
                      train={"global_batch_size": 32, "micro_batch_size": 16, "steps": STEPS, "log_every": 1,
                             "save_every": MOVE, **train})


def assert_same_batches(reference, run_dir, steps):
    want, got = batch_digests(reference), batch_digests(run_dir)
    for step in steps:
        assert got[step] == want[step], f"{run_dir.name}: step {step} holds other samples"


def assert_same_trajectory(reference, run_dir, steps):
    """The same loss and the same gradient norm at every step, bit for bit."""
    want, got = step_metrics(reference), step_metrics(run_dir)
    for step in steps:
        assert got[step] == want[step], f"{run_dir.name}: step {step} {got[step]} vs {reference.name}'s {want[step]}"


def step_metrics(run_dir) -> dict[int, tuple[float, float]]:
    """(loss, grad_norm) by step, the last record of each step winning (a resumed run re-logs steps)."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in jsonl(run_dir) if "step" in r and "loss" in r}


def test_one_run_on_any_topology_and_resumed_across_world_sizes_and_zero_stages(tmp_path, demo_data):
    """2 processes (micro 16, global 32); 1 process (micro 16, exact accumulation 2); 2
    processes with 2 loader workers each: the same batches, losses and gradient norms. Then the 2-process
    run's step-5 checkpoint resumed on 1 process under ZeRO-1, and the 1-process run's on
    2 processes under ZeRO-2, each continue the run they came from, with its batches."""
    runs = tmp_path / "runs"
    zero2, zero1 = ds_config(tmp_path, stage=2), ds_config(tmp_path, stage=1)
    launch(elastic_config(tmp_path, demo_data, "two"), zero2)
    launch(elastic_config(tmp_path, demo_data, "one"), zero2, processes=1)
    launch(elastic_config(tmp_path, demo_data, "workers", workers=2), zero2)
    every = range(1, STEPS + 1)
    for run_dir in (runs / "one", runs / "workers"):
        assert_same_batches(runs / "two", run_dir, every)
        assert_same_trajectory(runs / "two", run_dir, every)

    two_at_move = runs / "two" / "checkpoints" / f"step_{MOVE:08d}"
    result = launch(elastic_config(tmp_path, demo_data, "two_to_one", resume=str(two_at_move)), zero1, processes=1)
    assert "through DeepSpeed's universal checkpoint" in result.stdout
    assert (two_at_move / "universal" / "zero").is_dir()  # converted once, kept with the checkpoint
    one_at_move = runs / "one" / "checkpoints" / f"step_{MOVE:08d}"
    launch(elastic_config(tmp_path, demo_data, "one_to_two", resume=str(one_at_move)), zero2)
    later = range(MOVE + 1, STEPS + 1)
    assert min(batch_digests(runs / "two_to_one")) == MOVE + 1  # it resumed; it did not start over
    for moved in (runs / "two_to_one", runs / "one_to_two"):  # the fp32 weights and Adam's moments came over exactly
        assert_same_batches(runs / "two", moved, later)
        assert_same_trajectory(runs / "two", moved, later)

    # a checkpoint of another model is refused before any process group starts, in one line
    other = run_config(tmp_path, demo_data, "other", model={"name": "clip-tiny"}, data={"readers": 4},
                       train={"global_batch_size": 32, "micro_batch_size": 16, "resume": str(two_at_move)})
    result = subprocess.run(launcher_cmd(other, zero2, processes=1), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and errors and all(
        "was written with model.name=msclip-s-tiny, this run has model.name=clip-tiny" in e for e in errors), \
        result.stderr[-2000:]


def test_a_move_deepspeed_cannot_make_is_refused_before_launch(tmp_path, demo_data):
    """ZeRO-3 is not converted (DeepSpeed 0.19.8's stage-3 universal loader wants per-rank
    model files its conversion does not write): one line, before any process group."""
    config = elastic_config(tmp_path, demo_data, "z2", steps=2, save_every=2)
    launch(config, ds_config(tmp_path, stage=2))
    resumed = elastic_config(tmp_path, demo_data, "z3", resume=str(tmp_path / "runs" / "z2" / "checkpoints"))
    result = subprocess.run([sys.executable, "launch/train.py", "--deepspeed_config", str(ds_config(tmp_path, stage=3)),
                             "--config", str(resumed)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "was written with ZeRO stage 2 on 2 processes, this run has stage 3 on 1" in lines[0]
