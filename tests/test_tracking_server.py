"""Tracking against a live `mlflow server` on 127.0.0.1, as a team runs it: what the
sqlite default holds, the server holds too (the REST store is stricter than sqlite: an
int tag once kept every run off every server while every sqlite test passed)."""
import subprocess
import sys

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
    from pipeline.tracking import MetricsLogger
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
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import training_experiment
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_experiment("mixed", tags={"mlflow.experimentKind": "finetuning"})
    assert training_experiment(mlflow, "mixed").tags["mlflow.experimentKind"] == "finetuning"
    assert training_experiment(mlflow, "fresh") and \
        client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_a_launcher_run_eval_and_compare_hold_the_same_on_a_server_as_in_sqlite(tmp_path, demo_data, mlflow_server):
    """The same 4-step run twice, into the sqlite default and into the server, each then
    evaluated into its training run and compared: the two stores end up with the same
    params, tags, metrics (the same losses: fp32, same seed) and artifacts."""
    from mlflow.tracking import MlflowClient
    digits = str(demo_data / "eval" / "digits")
    sqlite = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    stores = {"local": sqlite, "remote": mlflow_server.uri}
    for name, uri in stores.items():
        tracking = {"experiment": f"live-{name}"} | ({"tracking_uri": uri} if name == "remote" else {})
        config = run_config(tmp_path, demo_data, name, train={"steps": 4, "log_every": 2},
                            eval={"every_steps": 2, "dataset": digits, "workers": 0}, tracking=tracking)
        result = launch(config, ds_config(tmp_path))
        assert "unavailable" not in result.stdout
        for command in (["eval", "--checkpoint", str(tmp_path / "runs" / name / "model.pt"), "--training-run",
                         "--zeroshot", digits, "--workers", "0", "--output", str(tmp_path / "runs" / name / "results.json")],
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
                  if k not in ("train.run_name", "tracking.tracking_uri", "tracking.experiment")}
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        metrics = sorted(k for k in run.data.metrics if not k.startswith("system/"))
        steps = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in metrics}
        losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        seen[name] = dict(params=params, tags=tags, metrics=metrics, steps=steps, losses=losses,
                          artifacts=artifact_paths(client, run.info.run_id))
        assert any(k.startswith("system/") for k in run.data.metrics), name
    local, remote = seen["local"], seen["remote"]
    assert remote["tags"]["world_size"] == "2" and "eval/zeroshot/digits/acc1" in remote["metrics"]
    assert {"config.yaml", "ds_config.json", "model.json", "eval/results.json",
            "comparison/comparison_live-remote.png"} <= remote["artifacts"]
    assert remote["params"] == local["params"]
    assert remote["tags"] == local["tags"]
    assert remote["metrics"] == local["metrics"] and remote["steps"] == local["steps"]
    assert remote["losses"] == local["losses"]
    assert remote["artifacts"] == {p.replace("live-local", "live-remote") for p in local["artifacts"]}
