"""One metrics logger: a local JSONL file always, MLflow as a sink, rank 0 only.

The JSONL (`<run dir>/metrics.jsonl`) is the record of truth: it is written even when
MLflow is down. MLflow failures never stop training: the first one is reported once,
the sink is switched off, and the JSONL says so (`{"event": "mlflow_unavailable"}`).
Values are moved to the host only when they are logged.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import torch

from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

# Fail fast instead of retrying for minutes against a tracking server that is not there.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def default_tracking_uri(output_dir: str | Path) -> str:
    """The embedded default: a sqlite store next to the run folders."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# MLflow 3 records an experiment's kind; an experiment without one is inferred, and the
# UI (3.17) opened ours on the GenAI overview (traces, latency) instead of the runs table.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def training_experiment(mlflow, name: str):
    """`mlflow.set_experiment(name)`, recorded as a model-training experiment unless the
    experiment already says what it is."""
    experiment = mlflow.set_experiment(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment


def tag_strings(tags: dict) -> dict[str, str]:
    """MLflow tags are strings. The sqlite store coerces other types; the REST store of an
    `mlflow server` raises a TypeError while serializing them, so an int tag (world_size)
    once kept every run off every team's tracking server."""
    return {k: str(v) for k, v in tags.items()}


def _plain(value):
    if torch.is_tensor(value):
        return value.detach().float().item() if value.numel() == 1 else value.detach().float().tolist()
    return value


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: TrackingConfig, output_dir: str | Path, run_name: str,
                 enabled: bool = True, run_id: str = "", tags: dict | None = None):
        self.enabled = enabled  # False on ranks other than 0: every method is a no-op
        self.run_id = run_id
        self.mlflow = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.uri = cfg.tracking_uri or default_tracking_uri(output_dir)
        try:
            import mlflow
            mlflow.set_tracking_uri(self.uri)
            experiment = training_experiment(mlflow, cfg.experiment)
            run = mlflow.start_run(run_id=run_id or None, run_name=None if run_id else run_name,
                                   experiment_id=experiment.experiment_id, log_system_metrics=cfg.system_metrics,
                                   tags=tag_strings({"git_commit": git_commit(), **(tags or {})}))
            self.mlflow, self.run_id = mlflow, run.info.run_id
        except Exception as e:  # any failure of the tracking server
            self._mlflow_failed(e)
        self.event("run_start", tracking_uri=self.uri, mlflow_run_id=self.run_id)

    # ---- sinks ---------------------------------------------------------------------
    def _mlflow_failed(self, error: Exception):
        msg = f"MLflow at {self.uri} is unavailable ({type(error).__name__}: {str(error)[:200]}); " \
              f"training goes on, metrics stay in {self.run_dir / 'metrics.jsonl'}"
        log.warning(msg, exc_info=error)
        print(f"[tracking] {msg}", flush=True)
        self.mlflow = None
        self.event("mlflow_unavailable", error=f"{type(error).__name__}: {str(error)[:500]}")

    def _call(self, method: str, *args, **kwargs):
        if self.mlflow is None:
            return
        try:
            getattr(self.mlflow, method)(*args, **kwargs)
        except Exception as e:
            self._mlflow_failed(e)

    def event(self, name: str, **fields):
        if self.enabled:
            self.jsonl.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")

    # ---- what the trainer calls -------------------------------------------------------
    def log_params(self, params: dict):
        if not self.enabled:
            return
        self.event("params", params=params)
        # MLflow caps a param value at 6000 characters and a batch at 100 params.
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_params", dict(items[i:i + 100]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        if self.enabled:
            self._call("log_artifact", str(path), artifact_path)

    def set_tags(self, tags: dict):
        if self.enabled:
            self._call("set_tags", tag_strings(tags))

    def log_metrics(self, metrics: dict, step: int):
        """Tensors are read here (a host sync), so call this on log steps only."""
        if not self.enabled:
            return
        values = {k: _plain(v) for k, v in metrics.items() if v is not None}
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._call("log_metrics", {k: float(v) for k, v in values.items()}, step=step)

    def log_model(self, exported: str | Path):
        """The final export as an MLflow Model of this run (`tracking.log_model`). The export
        exists only after the run is closed, so the finished run is reopened for it; an
        unreachable server loses nothing (the export stays on disk)."""
        if not self.enabled:
            return
        if self.mlflow is None:
            print(f"[tracking] MLflow is unavailable: the model was not logged; {exported} holds it", flush=True)
            return
        try:
            from pipeline.mlflow_model import log_model
            with self.mlflow.start_run(run_id=self.run_id):
                uri = log_model(exported)
            print(f"[tracking] model logged: {uri}", flush=True)
        except Exception as e:  # noqa: BLE001 (a failing server must not fail a finished run)
            print(f"[tracking] the model was not logged ({type(e).__name__}: {str(e)[:200]}); {exported} holds it",
                  flush=True)

    def close(self, status: str = "FINISHED"):
        if not self.enabled:
            return
        self.event("run_end", status=status)
        self._call("end_run", status=status)
        self.jsonl.close()
