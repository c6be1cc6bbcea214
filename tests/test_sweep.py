"""launch.sweep through the real launcher: children nested under one MLflow parent with
the summary, and an interrupted sweep that resumes without re-running a finished child."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from test_train_e2e import run_config


def test_variants_are_the_grid_crossed_with_the_list_and_select_runs_the_best_value_on_every_seed(tmp_path):
    """The plan without a launcher: --list x --grid x seeds; with --select each variant
    first tries every value at the first seed, and its best (by the metric; the lowest
    loss) alone runs the other seeds."""
    from types import SimpleNamespace

    from launch.sweep import choose, counted, label, parse_grid, plan, read_list, variants
    listed = tmp_path / "list.yaml"
    listed.write_text("- {model.overrides.share: none}\n- {name: ms, overrides: {model.overrides.share: all}}\n")
    grid = variants(parse_grid(["train.steps=5,10"]), read_list(str(listed)))
    assert [label(v) for v in grid] == ["share=none steps=5", "share=none steps=10", "share=all steps=5",
                                        "share=all steps=10"]
    assert [c["run_name"] for c in plan("s", grid[:2], [0, 1], None)] == ["s-00-s0", "s-00-s1", "s-01-s0", "s-01-s1"]
    select = parse_grid(["optim.lr=1e-4,1e-3"])[0]
    state = {"name": "s", "children": plan("s", grid[:2], [0, 1, 2], select)}
    assert [(c["run_name"], c["overrides"]["optim.lr"]) for c in state["children"]] == [
        ("s-00-0-s0", "1e-4"), ("s-00-1-s0", "1e-3"), ("s-01-0-s0", "1e-4"), ("s-01-1-s0", "1e-3")]
    scores = {"s-00-0-s0": 0.5, "s-00-1-s0": 0.25, "s-01-0-s0": 0.1, "s-01-1-s0": 0.75}
    runs = {name: SimpleNamespace(data=SimpleNamespace(metrics={"acc1": v, "loss": 1 - v}))
            for name, v in scores.items()}
    choose(state, runs, select, "acc1", [0, 1, 2])
    assert state["selected"] == {"0": "1e-4", "1": "1e-3"}
    assert [c["run_name"] for c in counted(state)] == ["s-00-0-s0", "s-01-1-s0", "s-00-0-s1", "s-00-0-s2",
                                                       "s-01-1-s1", "s-01-1-s2"]
    lowest_loss = {"name": "s", "children": plan("s", grid[:1], [0], select)}
    choose(lowest_loss, runs, select, "loss", [0])
    assert lowest_loss["selected"] == {"0": "1e-4"}


@pytest.mark.slow
def sweep_cmd(config, name, demo_data):
    return [sys.executable, "-m", "launch.sweep", "--config", str(config), "--deepspeed_config",
            str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"), "--grid", "optim.lr=2e-4,5e-4", "--name", name,
            "--eval", str(demo_data / "eval" / "digits")]


def test_a_two_variant_sweep_nests_its_runs_summarizes_them_and_resumes_after_a_kill(tmp_path, demo_data):
    from mlflow.tracking import MlflowClient
    config = run_config(tmp_path, demo_data, "unused", train={"steps": 6, "save_every": 2, "log_every": 2,
                                                                "run_name": ""})
    runs = tmp_path / "runs"
    state_file = runs / "lr" / "sweep.json"
    # the first attempt is killed (the whole process group, launcher and ranks) once the
    # first child is finished and the second has a checkpoint
    first = subprocess.Popen(sweep_cmd(config, "lr", demo_data), cwd=REPO_ROOT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        if state and state["children"][0]["done"] and (runs / "lr-01-s0" / "checkpoints").is_dir() and any(
                (p / "COMPLETE.json").is_file() for p in (runs / "lr-01-s0" / "checkpoints").iterdir()):
            break
        time.sleep(0.5)
    assert first.poll() is None, f"the sweep ended before it could be interrupted:\n{first.stdout.read()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    kept = client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                              filter_string="attributes.run_name = 'lr-00-s0'")
    assert len(kept) == 1

    second = subprocess.run(sweep_cmd(config, "lr", demo_data), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "lr-00-s0: finished before, kept" in second.stdout
    assert "resumed at step" in second.stdout  # the second child went on from its checkpoint

    experiment = client.get_experiment_by_name("e2e").experiment_id
    parent = json.loads(state_file.read_text())["parent_run_id"]
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["lr-00-s0", "lr-01-s0"]
    assert [r.info.run_id for r in children if r.info.run_name == "lr-00-s0"] == [kept[0].info.run_id]  # not re-run
    for r in children:
        assert r.info.status == "FINISHED" and "eval/zeroshot/digits/acc1" in r.data.metrics, r.data.metrics
    assert {r.data.params["optim.lr"] for r in children} == {"0.0002", "0.0005"}
    assert client.get_run(parent).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert artifacts == {"sweep/runs.csv", "sweep/summary.csv", "sweep/summary.png", "sweep/curves.png"}
    with open(client.download_artifacts(parent, "sweep/summary.csv", str(tmp_path))) as f:
        header, *rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["lr=2e-4", "lr=5e-4"] and all(r[1] == "1" for r in rows)
    by_variant = {r.data.params["optim.lr"]: r.data.metrics for r in children}
    column = header.index("zeroshot digits acc1 mean")
    assert [float(r[column]) for r in rows] == pytest.approx(
        [by_variant[lr]["eval/zeroshot/digits/acc1"] for lr in ("0.0002", "0.0005")], abs=1e-4)
