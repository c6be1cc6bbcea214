"""python -m eval.compare against a real MLflow store: it picks the experiment's training
runs (not eval-only runs), shows their final metrics and sizes, refuses unknown names,
logs the curves plot into every compared run, and groups runs that differ only by seed."""
import csv

import pytest

from eval.compare import main


def open_store(tmp_path, experiment: str) -> str:
    """A sqlite store with `experiment` made active, created as the trainer creates it:
    artifacts beside the store (MLflow's default is ./mlruns)."""
    import mlflow

    from pipeline.tracking.store import training_experiment
    uri = f"sqlite:///{tmp_path / f'{experiment}.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=training_experiment(mlflow.MlflowClient(), experiment))
    return uri


def log_reference(model: str, acc1: float):
    """A released model's reference line, as `python -m eval --format ...` logs it."""
    import mlflow
    with mlflow.start_run(run_name="released", tags={"model": model, "task": "eval", "reference": "true"}):
        mlflow.log_metric("eval/zeroshot/digits/acc1", acc1, step=0)


@pytest.fixture
def store(tmp_path):
    import mlflow
    uri = open_store(tmp_path, "cmp")
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
    log_reference("msclip-s-tiny", 0.7)
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


@pytest.fixture
def seeded_store(tmp_path):
    """Two learning rates over seeds, started by hand and by a sweep (other names, output
    folders, a parent run), a run that differs by its model, one by its step count, and a
    released model's reference line (no params)."""
    import mlflow
    uri = open_store(tmp_path, "seeds")
    runs = [("lr1-s0", "clip-tiny", "0.001", 0, 2, 0.5, 3.0), ("lr1-s1", "clip-tiny", "0.001", 1, 2, 0.6, 2.5),
            ("sweep-00-s2", "clip-tiny", "0.001", 2, 2, 0.8, 2.0), ("lr2-s0", "clip-tiny", "0.002", 0, 2, 0.3, 3.5),
            ("lr2-s1", "clip-tiny", "0.002", 1, 2, 0.4, 3.1), ("shared", "msclip-s-tiny", "0.001", 0, 2, 0.9, 1.0),
            ("longer", "clip-tiny", "0.001", 0, 4, 0.7, 1.5)]
    for name, model, lr, seed, steps, acc, loss in runs:
        with mlflow.start_run(run_name=name, tags={"model": model}):
            mlflow.log_params({"model.name": model, "optim.lr": lr, "train.seed": seed, "train.steps": steps,
                               "train.run_name": name, "train.output_dir": f"/scratch/{name}",
                               "tracking.parent_run_id": "abc" if name.startswith("sweep") else ""})
            mlflow.log_metric("loss", loss, step=steps)
            mlflow.log_metric("eval/zeroshot/digits/acc1", acc, step=steps)
    log_reference("clip-tiny", 0.95)
    return uri


def test_runs_that_differ_only_by_seed_show_as_one_row_with_mean_and_std(seeded_store, tmp_path, capsys):
    import numpy as np
    from mlflow.tracking import MlflowClient
    table = tmp_path / "groups.csv"
    assert main(["--experiment", "seeds", "--tracking-uri", seeded_store, "--group-csv", str(table)]) == 0
    out = capsys.readouterr().out
    header, *rows = list(csv.reader(table.open()))
    assert header == ["group", "runs", "train.seed", "model", "loss mean", "loss std",
                      "zeroshot digits acc1 mean", "zeroshot digits acc1 std"]
    # lr1 over 3 seeds (two by hand, one by a sweep), lr2 over 2, shared, longer, the reference line
    assert sorted((r[1], r[2]) for r in rows) == [("1", ""), ("1", "0"), ("1", "0"), ("2", "0,1"), ("3", "0,1,2")]
    by_seeds = {(r[1], r[2]): dict(zip(header, r)) for r in rows}
    for seeds, accs, losses in ((("3", "0,1,2"), [0.5, 0.6, 0.8], [3.0, 2.5, 2.0]),
                                (("2", "0,1"), [0.3, 0.4], [3.5, 3.1])):
        row = by_seeds[seeds]
        assert row["zeroshot digits acc1 mean"] == f"{np.mean(accs):.4f}"
        assert row["zeroshot digits acc1 std"] == f"{np.std(accs, ddof=1):.4f}"
        assert row["loss mean"] == f"{np.mean(losses):.4f}" and row["loss std"] == f"{np.std(losses, ddof=1):.4f}"
    assert by_seeds[("3", "0,1,2")]["group"] == "model.name=clip-tiny, optim.lr=0.001, train.steps=2"
    assert {r[0] for r in rows if r[1] == "1"} == {"released", "model.name=msclip-s-tiny, optim.lr=0.001, train.steps=2",
                                                   "model.name=clip-tiny, optim.lr=0.001, train.steps=4"}
    assert "over train.seed: mean +- std" in out and f"{np.mean([0.5, 0.6, 0.8]):.4f} +- " in out
    client = MlflowClient(tracking_uri=seeded_store)
    for run in client.search_runs([client.get_experiment_by_name("seeds").experiment_id]):
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}
        assert logged == {"comparison/comparison_seeds.png", "comparison/groups_seeds.png"}


def test_runs_are_grouped_over_a_named_param(seeded_store, tmp_path):
    table = tmp_path / "groups.csv"
    assert main(["--experiment", "seeds", "--tracking-uri", seeded_store, "--over", "optim.lr", "--no-plot",
                 "--group-csv", str(table)]) == 0
    header, *rows = list(csv.reader(table.open()))
    spans = sorted((r[1], r[2]) for r in rows if r[1] != "1")
    assert spans == [("2", "0.001,0.002"), ("2", "0.001,0.002")]  # seed 0's two rates, seed 1's; seed 2 alone
    assert header[2] == "optim.lr"
