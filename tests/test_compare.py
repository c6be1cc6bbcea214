"""python -m eval.compare against a real MLflow store: it picks the experiment's training
runs (not eval-only runs), shows their final metrics and sizes, refuses unknown names,
and logs the curves plot into every compared run."""
import csv

import pytest

from eval.compare import main


@pytest.fixture
def store(tmp_path):
    import mlflow

    from pipeline.tracking.store import training_experiment
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # as the trainer creates it: artifacts beside the store (MLflow's default is ./mlruns)
    mlflow.set_experiment(experiment_id=training_experiment(mlflow.MlflowClient(), "cmp"))
    for name, model, total, losses, acc in (("base", "clip-tiny", 8_830_000, [4.1, 3.9], 0.2),
                                            ("shared", "msclip-s-tiny", 7_790_000, [4.0, 2.0], 0.9)):
        with mlflow.start_run(run_name=name, tags={"model": model}):
            mlflow.log_params({"params_total": total, "shared_fraction": 0.0 if model == "clip-tiny" else 0.127,
                               "train.steps": 2})
            for step, loss in enumerate(losses, 1):
                mlflow.log_metric("loss", loss, step=step)
            mlflow.log_metric("eval/zeroshot/digits/acc1", acc, step=2)
    with mlflow.start_run(run_name="eval-only", tags={"model": "clip-tiny", "task": "eval"}):
        mlflow.log_metric("eval/zeroshot/digits/acc1", 0.5, step=0)
    with mlflow.start_run(run_name="released", tags={"model": "msclip-s-tiny", "task": "eval", "reference": "true"}):
        mlflow.log_metric("eval/zeroshot/digits/acc1", 0.7, step=0)
    return uri


def test_table_holds_the_final_metrics_of_training_runs_only(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    table = tmp_path / "t.csv"
    assert main(["--experiment", "cmp", "--tracking-uri", store, "--csv", str(table)]) == 0
    header, *rows = list(csv.reader(table.open()))
    assert header[:7] == ["run", "kind", "model", "params (M)", "shared", "steps", "loss"]
    assert [r[0] for r in rows] == ["base", "shared", "released"]  # not the eval-only run; the reference line
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_name["released"]["kind"] == "reference" and by_name["base"]["kind"] == "trained"
    assert by_name["released"]["zeroshot digits acc1"] == "0.7000" and by_name["released"]["loss"] == ""
    assert by_name["shared"]["loss"] == "2.0000" and by_name["base"]["loss"] == "3.9000"  # last value, not first
    assert by_name["shared"]["zeroshot digits acc1"] == "0.9000" and by_name["base"]["params (M)"] == "8.83"
    out = capsys.readouterr().out
    client = MlflowClient(tracking_uri=store)
    assert "shared" in out
    # the page that shows the runs: MLflow 3.17's UI opens on its GenAI overview otherwise
    experiment_id = client.get_experiment_by_name("cmp").experiment_id
    assert f"/#/experiments/{experiment_id}?workflowType=machine_learning" in out
    for run in client.search_runs([client.get_experiment_by_name("cmp").experiment_id]):
        logged = [a.path for a in client.list_artifacts(run.info.run_id, "comparison")]
        assert logged == (["comparison/comparison_cmp.png"] if run.info.run_name != "eval-only" else [])


def test_unknown_run_or_experiment_is_one_line(store, capsys):
    assert main(["--experiment", "cmp", "--tracking-uri", store, "--runs", "nope", "--no-plot"]) == 2
    assert capsys.readouterr().err.strip() == "error: --runs: nope not in experiment 'cmp'"
    assert main(["--experiment", "other", "--tracking-uri", store]) == 2
    assert "no such experiment" in capsys.readouterr().err
