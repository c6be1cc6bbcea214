"""Tracking against a live `mlflow server` on 127.0.0.1, as a team runs it: what the
sqlite default holds, the server holds too (the REST store is stricter than sqlite: an
int tag once kept every run off every server while every sqlite test passed)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_train_e2e import launch, run_config, ds_config


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_logger_writes_params_tags_metrics_and_artifacts_to_a_live_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="logger", system_metrics=False)
    logger = MetricsLogger(tmp_path / "run", cfg, tmp_path, "r", tags={"world_size": 2, "model": "clip-tiny"})
    logger.log_params({"train.steps": 3, "optim.lr": 1e-3})
    logger.log_metrics({"loss": 2.5, "epoch": 0, "skipped_steps": 0}, step=1)
    (tmp_path / "note.txt").write_text("x")
    logger.log_artifact(tmp_path / "note.txt")
    logger.close()
    assert '"mlflow_unavailable"' not in (tmp_path / "run" / "metrics.jsonl").read_text()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["model"] == "clip-tiny"
    assert run.data.params == {"train.steps": "3", "optim.lr": "0.001"}
    assert run.data.metrics == {"loss": 2.5, "epoch": 0.0, "skipped_steps": 0.0}
    assert artifact_paths(client, run.info.run_id) == {"note.txt"}
    # a model-training experiment: `mlflow ui` (3.17) opens it on the runs, not the GenAI overview
    assert client.get_experiment_by_name("logger").tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_that_says_its_kind_keeps_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import training_experiment
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mixed = client.create_experiment("mixed", tags={"mlflow.experimentKind": "finetuning"})
    assert training_experiment(client, "mixed") == mixed
    assert client.get_experiment(mixed).tags["mlflow.experimentKind"] == "finetuning"
    assert training_experiment(client, "fresh") == client.get_experiment_by_name("fresh").experiment_id
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    untagged = client.create_experiment("untagged")
    assert training_experiment(client, "untagged") == untagged
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == "custom_model_development"
    # a new experiment keeps its artifacts beside its sqlite store, wherever the process runs
    # (MLflow's default was ./mlruns: the checkout, for every demo run; issue 37)
    fresh = client.get_experiment_by_name("fresh")
    assert fresh.artifact_location == (tmp_path / "artifacts").as_uri()


def eval_set_on_s3(s3_server, digits: Path, scratch: Path) -> str:
    """The demo's class-folder eval set, the same PNG bytes, in CLIP_benchmark's webdataset
    layout on the S3 store (as such sets are published)."""
    import io
    import tarfile
    local = scratch / "digits"
    (local / "test").mkdir(parents=True)
    with tarfile.open(local / "test" / "0.tar", "w") as tar:
        for i, path in enumerate(sorted((digits / "test").glob("*/*.png"))):
            for suffix, data in (("png", path.read_bytes()), ("cls", path.parent.name.encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (local / "test" / "nshards.txt").write_text("1\n")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (local / name).write_bytes((digits / name).read_bytes())
    s3_server.upload(local, "eval/digits")
    return s3_server.url("eval/digits")


@pytest.mark.slow
def test_a_launcher_run_eval_and_compare_hold_the_same_on_a_server_as_in_sqlite(tmp_path, demo_data, mlflow_server,
                                                                               s3_server, monkeypatch):
    """The same 4-step run three times: into the sqlite default, into the server, and
    offline (no MLflow at all) then synced into the server; each then evaluated into its
    training run and compared: the stores end up with the same params, tags, metrics (the
    same losses: fp32, same seed) and artifacts, and a second sync sends nothing.
    The server's run is a team's whole object-store set-up (issue 32): its shards are read
    from s3:// (uploaded with their manifests), its evaluation set too, and the server keeps
    its artifacts in the S3 bucket; the same losses and the same accuracy say the remote
    reads gave the same samples."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MSCLIP_CACHE", str(tmp_path / "cache"))
    digits = str(demo_data / "eval" / "digits")
    for source in ("digits", "photos"):
        s3_server.upload(demo_data / "shards" / source, f"demo/{source}")
    remote_shards = f"{s3_server.url('demo/digits')}::{s3_server.url('demo/photos')}"
    remote_digits = eval_set_on_s3(s3_server, Path(digits), tmp_path / "wds")
    sqlite = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    stores = {"local": sqlite, "remote": mlflow_server.uri, "offline": mlflow_server.uri}
    for name, uri in stores.items():
        tracking = {"experiment": f"live-{name}"} | ({"tracking_uri": uri} if name != "local" else {}) | \
                   ({"mode": "offline"} if name == "offline" else {})
        data = {"train_shards": remote_shards} if name == "remote" else {}
        config = run_config(tmp_path, demo_data, name, train={"steps": 4, "log_every": 2}, data=data,
                            eval={"every_steps": 2, "dataset": digits, "workers": 0}, tracking=tracking)
        result = launch(config, ds_config(tmp_path))
        assert "unavailable" not in result.stdout
        if name == "offline":
            assert MlflowClient(tracking_uri=uri).get_experiment_by_name("live-offline") is None
            assert sync(str(tmp_path / "runs" / name)).returncode == 0
        eval_set = remote_digits if name == "remote" else digits
        for command in (["eval", "--checkpoint", str(tmp_path / "runs" / name / "model.pt"), "--training-run",
                         "--zeroshot", eval_set, "--workers", "0", "--output",
                         str(tmp_path / "runs" / name / "results.json")],
                        ["eval.compare", "--experiment", f"live-{name}"]):
            done = subprocess.run([sys.executable, "-m", *command, "--tracking-uri", uri], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    seen = {}
    for name, uri in stores.items():
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name(f"live-{name}").experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == name
        params = {k: v for k, v in run.data.params.items()
                  if k not in ("train.run_name", "tracking.tracking_uri", "tracking.experiment", "tracking.mode")}
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        metrics = sorted(k for k in run.data.metrics if not k.startswith("system/"))
        steps = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in metrics}
        losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        seen[name] = dict(params=params, tags=tags, metrics=metrics, steps=steps, losses=losses,
                          artifacts=artifact_paths(client, run.info.run_id))
        # MLflow's system metrics go straight to the store: none for the offline run
        assert any(k.startswith("system/") for k in run.data.metrics) == (name != "offline"), name
    again = sync(str(tmp_path / "runs" / "offline"))
    assert again.returncode == 0 and ": 0 records sent" in again.stdout, again.stdout
    local, remote = seen["local"], seen["remote"]
    offline = seen["offline"]
    assert {k: v for k, v in offline.items() if k != "artifacts"} == \
        {k: v for k, v in local.items() if k != "artifacts"}
    assert offline["artifacts"] == {p.replace("live-local", "live-offline") for p in local["artifacts"]}
    assert remote["tags"]["world_size"] == "2" and "eval/zeroshot/digits/acc1" in remote["metrics"]
    assert {"config.yaml", "ds_config.json", "model.json", "eval/results.json",
            "comparison/comparison_live-remote.png"} <= remote["artifacts"]
    assert remote["params"] == {**local["params"], "data.train_shards": remote_shards}
    assert remote["tags"] == {**local["tags"], "dataset": remote_shards}
    assert remote["metrics"] == local["metrics"] and remote["steps"] == local["steps"]
    assert remote["losses"] == local["losses"]
    assert remote["artifacts"] == {p.replace("live-local", "live-remote") for p in local["artifacts"]}
    # the server kept them in the bucket; the evaluation from s3:// scored as the local one
    in_bucket = s3_server.keys("mlartifacts/")
    for artifact in ("config.yaml", "model.json", "eval/results.json", "comparison/comparison_live-remote.png"):
        assert any(key.endswith(f"/artifacts/{artifact}") for key in in_bucket), (artifact, in_bucket)
    results = {name: [(r["task"], r["dataset"], r["metrics"]) for r in json.loads(
        (tmp_path / "runs" / name / "results.json").read_text())] for name in ("local", "remote")}
    assert results["remote"] == results["local"], results


# ---- nothing lost: offline runs, sync, refusals, outages ------------------------------------

def log_a_run(logger, tmp_path, steps=range(1, 6)):
    """What the trainer logs, in its order: params, tags, an artifact, metrics (tensors
    among them), events that are only the JSONL's."""
    import torch
    logger.log_params({"train.steps": 5, "optim.lr": 1e-3})
    logger.set_tags({"init_from_keys": 3})
    note = tmp_path / "config.yaml"
    note.write_text("train: {steps: 5}\n")
    logger.log_artifact(note)
    for step in steps:
        logger.log_metrics({"loss": torch.tensor(3.0 - 0.1 * step), "lr/shared": 1e-3 * step, "skipped": None}, step)
        logger.event("batch", step=step, keys_sha1="x")


def stored(uri: str, experiment: str) -> dict:
    """Everything an MLflow store holds of the one run of `experiment` that a comparison of
    runs would look at (not its ids or times)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                      key=lambda m: m.step)] for k in run.data.metrics}
    return {"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            "metrics": history, "artifacts": artifact_paths(client, run.info.run_id)}


def sync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_an_offline_run_synced_later_equals_the_online_run_and_a_second_sync_adds_nothing(tmp_path, mlflow_server):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    online_uri = f"sqlite:///{tmp_path / 'online.db'}"
    online = MetricsLogger(tmp_path / "runs" / "online", TrackingConfig(
        tracking_uri=online_uri, experiment="same", system_metrics=False), tmp_path, "r", tags={"world_size": 2})
    log_a_run(online, tmp_path)
    online.close()
    # offline, configured for the team's server: nothing reaches it until the sync
    offline = MetricsLogger(tmp_path / "runs" / "offline", TrackingConfig(
        tracking_uri=mlflow_server.uri, experiment="same-offline", mode="offline"), tmp_path, "r",
        tags={"world_size": 2})
    log_a_run(offline, tmp_path, steps=range(1, 3))
    from mlflow.tracking import MlflowClient
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name("same-offline") is None

    first = sync(str(tmp_path / "runs" / "offline"))  # to the URI the run was configured with
    assert first.returncode == 0 and f"sent to {mlflow_server.uri}" in first.stdout, first.stderr
    partial = stored(mlflow_server.uri, "same-offline")
    assert partial["status"] == "RUNNING" and [s for s, _ in partial["metrics"]["loss"]] == [1, 2]
    # the run goes on (a node that syncs now and then): the next sync completes it
    log_a_run(offline, tmp_path, steps=range(3, 6))
    offline.close()
    assert sync(str(tmp_path / "runs")).returncode == 0  # a folder of runs: each to its own URI
    synced = stored(mlflow_server.uri, "same-offline")
    assert synced == stored(online_uri, "same")
    assert synced["status"] == "FINISHED" and [s for s, _ in synced["metrics"]["loss"]] == [1, 2, 3, 4, 5]

    again = sync(str(tmp_path / "runs" / "offline"))
    assert again.returncode == 0 and ": 0 records sent" in again.stdout, again.stdout
    assert stored(mlflow_server.uri, "same-offline") == synced
    # the online run's store, synced into the server too: the same run, a second time nothing
    assert sync(str(tmp_path / "runs" / "online"), "--tracking-uri", mlflow_server.uri).returncode == 0
    assert stored(mlflow_server.uri, "same") == synced


def test_a_record_mlflow_refuses_is_reported_and_the_rest_still_goes(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MetricsLogger(tmp_path / "run", TrackingConfig(tracking_uri=uri, experiment="refused",
                                                            system_metrics=False), tmp_path, "r")
    log_a_run(logger, tmp_path)
    logger.log_params({"optim.lr": 2e-3})  # MLflow never changes a logged param: refused, not retried
    logger.log_metrics({"loss": 1.0}, 6)
    logger.close()
    assert logger.sync.refused == 1 and logger.sync.pending() == 0
    run = stored(uri, "refused")
    assert run["params"]["optim.lr"] == "0.001" and run["metrics"]["loss"][-1] == (6, 1.0)
    assert run["status"] == "FINISHED"


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="resumed", system_metrics=False)
    first = MetricsLogger(tmp_path / "run", cfg, tmp_path, "r")
    log_a_run(first, tmp_path, steps=range(1, 3))
    first.close("KILLED")
    second = MetricsLogger(tmp_path / "run", cfg, tmp_path, "r", run_id=first.run_id)
    for step in (3, 4):
        second.log_metrics({"loss": 1.0 / step}, step)
    second.close()
    assert second.run_id == first.run_id
    run = stored(uri, "resumed")  # one run: stored() unpacks exactly one
    assert run["status"] == "FINISHED" and [s for s, _ in run["metrics"]["loss"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_server_outage_mid_run_loses_no_step_and_stalls_no_step(tmp_path, demo_data):
    """The server is stopped after step 2 and restarted while the run trains on: every
    logged step reaches MLflow, in order, and training went on through the outage (the
    trainer only appends to its JSONL; the replay thread does the waiting). The run is
    long and is stopped (SIGTERM, a preemption) a few steps after the replay has recovered:
    a fixed length raced the server's restart on a busy machine."""
    import time

    from conftest import MlflowServer
    from mlflow.tracking import MlflowClient
    from test_train_e2e import jsonl_so_far, launcher_cmd
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    steps = 5000  # ~0.2 s a step here; stopped once the replay has recovered
    config = run_config(tmp_path, demo_data, "outage", train={"steps": steps, "log_every": 1, "save_every": 1000,
                                                              "global_batch_size": 16, "micro_batch_size": 8},
                        tracking={"tracking_uri": server.uri, "experiment": "outage", "flush_seconds": 300})
    run_dir = tmp_path / "runs" / "outage"
    proc = subprocess.Popen(launcher_cmd(config, ds_config(tmp_path)), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for(condition, what: str, timeout: float = 300):
        deadline = time.time() + timeout
        while not condition():
            assert proc.poll() is None and time.time() < deadline, f"{what}: " + proc.communicate()[0][-4000:]
            time.sleep(0.2)

    def logged():
        return [r["step"] for r in jsonl_so_far(run_dir) if "loss" in r]

    try:
        wait_for(lambda: len(logged()) >= 2, "step 2")
        server.stop()
        down_at = len(logged())
        wait_for(lambda: any(r.get("event") == "mlflow_unavailable" for r in jsonl_so_far(run_dir)), "the outage")
        wait_for(lambda: len(logged()) >= down_at + 10, "10 steps during the outage")
        server.start()
        wait_for(lambda: any(r.get("event") == "mlflow_recovered" for r in jsonl_so_far(run_dir)), "the recovery")
        recovered_at = len(logged())
        wait_for(lambda: len(logged()) >= recovered_at + 5, "5 steps after the recovery")
        os.killpg(proc.pid, signal.SIGTERM)  # a preemption: the run stops at a step boundary
        output = proc.communicate(timeout=600)[0]
    finally:
        server.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the trainers stopped cleanly (the deepspeed launcher itself exits -15 on SIGTERM)
    assert "checkpoint saved; resume with train.resume=latest" in output, output[-4000:]
    records = jsonl_so_far(run_dir)
    events = [r["event"] for r in records if r.get("event", "").startswith("mlflow_") or r.get("event") == "run_end"]
    # the server was back while the run still trained (not only for the final flush)
    assert events == ["mlflow_unavailable", "mlflow_recovered", "run_end"], events
    up_at = next(i for i, r in enumerate(records) if r.get("event") == "mlflow_recovered")
    up_at = max(r["step"] for r in records[:up_at] if "loss" in r)
    server.start()  # to read it back
    try:
        client = MlflowClient(tracking_uri=server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert run.info.status == "KILLED"  # preempted, as it was
    finally:
        server.stop()
    assert losses == [(r["step"], r["loss"]) for r in records if "loss" in r]  # every step, once
    last = max(r["step"] for r in records if "loss" in r)
    assert last < steps and [s for s, _ in losses] == list(range(1, last + 1))
    # No step waited on the network: training went on through the outage (the wait_for
    # above needed 10 steps of it). The step rates are printed for the log, not asserted
    # (the server's restart competes for the same 2 cores).
    rate = {r["step"]: round(r["samples_per_s"], 1) for r in records if "samples_per_s" in r}
    print(f"samples/s during the outage (steps {down_at + 1}..{up_at}):",
          [rate[s] for s in range(down_at + 1, up_at + 1)], "others:",
          [rate[s] for s in rate if not down_at < s <= up_at])


def test_a_store_that_comes_back_gets_every_record_and_no_false_alarm(tmp_path, capsys):
    """An outage without a server: the sqlite store's folder cannot be made (a file is in
    the way) until the test removes the file; the records of the outage go in when it can,
    and the end of the run does not claim records are missing."""
    import time

    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    blocker = tmp_path / "store"
    blocker.write_text("in the way")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    logger = MetricsLogger(tmp_path / "run", TrackingConfig(tracking_uri=uri, experiment="back", system_metrics=False),
                           tmp_path, "r")
    log_a_run(logger, tmp_path, steps=range(1, 4))
    deadline = time.time() + 30
    while '"mlflow_unavailable"' not in (tmp_path / "run" / "metrics.jsonl").read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    blocker.unlink()  # the store can be made now
    for step in (4, 5):
        logger.log_metrics({"loss": 1.0 / step}, step)
    logger.close()
    out = capsys.readouterr().out
    assert "is unavailable" in out and "answers again" in out and "not in MLflow yet" not in out, out
    run = stored(uri, "back")
    assert run["status"] == "FINISHED" and [s for s, _ in run["metrics"]["loss"]] == [1, 2, 3, 4, 5]
    assert run["params"] == {"train.steps": "5", "optim.lr": "0.001"} and run["artifacts"] == {"config.yaml"}
