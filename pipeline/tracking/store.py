"""The MLflow store rule of every entry point, and the experiments runs go into.

One rule (train, eval, eval.suite, eval.compare, the sweeps, `python -m pipeline.tracking
sync`): the URI given (--tracking-uri, tracking.tracking_uri), else MLFLOW_TRACKING_URI,
else the sqlite store in the run folders' directory. Plain Python until MLflow is needed.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.redact import redact


def default_tracking_uri(output_dir: str | Path) -> str:
    """The embedded default: a sqlite store next to the run folders."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(given: str = "", output_dir: str | Path = "runs") -> str:
    """The one rule of every entry point (train, eval, eval.suite, eval.compare, sweep):
    the URI given (--tracking-uri, tracking.tracking_uri), else MLFLOW_TRACKING_URI, else
    the sqlite store in the run folders' directory: `runs/mlflow.db` of the working folder
    (training: `<train.output_dir>/mlflow.db`). `pipeline.tracking sync` first takes the
    URI each run recorded."""
    return given or os.environ.get("MLFLOW_TRACKING_URI", "") or default_tracking_uri(output_dir)


def use_store(uri: str) -> None:
    """mlflow.set_tracking_uri for this process only. MLflow's own also exports
    MLFLOW_TRACKING_URI so that subprocesses inherit it; under the rule above, a training
    run started later from this process (a notebook, the sweep) would then log into this
    store instead of its own."""
    import mlflow
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def announce_store(uri: str) -> None:
    """Each entry point says where its runs go before it does anything else."""
    print(f"mlflow store: {store_key(uri)}", flush=True)


def store_key(uri: str) -> str:
    """How a tracking URI is written down (the sync state, the JSONL): without its
    credentials (pipeline/redact.py)."""
    return redact(uri)


# MLflow 3 records an experiment's kind; an experiment without one is inferred, and the
# UI (3.17) opened ours on the GenAI overview (traces, latency) instead of the runs table.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (`X/mlflow.db` ->
    `X/artifacts`); elsewhere the server's own root (None). Without it MLflow put them in
    `./mlruns` of whatever folder the process ran in: the checkout, for launch/demo.sh with
    any --workdir (issue 37)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def training_experiment(client, name: str) -> str:
    """The id of experiment `name`, created as a model-training experiment (its artifacts
    beside a sqlite store), or marked as one unless it already says what it is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where `mlflow ui` shows an experiment's runs table. MLflow 3.17's UI opens every
    experiment on its GenAI overview (traces, latency) unless the page asks for the
    model-training view: the experiment-kind tag alone did not do it (seen in a headless
    browser, 2026-11-30); the "Model training" switch at the top left is the same choice."""
    return f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning"
