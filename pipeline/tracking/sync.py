"""The replay of a run folder's metrics.jsonl into one MLflow store (`RunSync`), in order,
from the first record that store has not taken yet; the online logger runs it in a
background thread (pipeline/tracking/logger.py), `python -m pipeline.tracking sync`
afterwards (pipeline/tracking/__main__.py).

How far each store got (its run id and the byte offset reached) is kept per tracking URI
in `<run dir>/mlflow_sync.json`, written after every batch the store accepted, so a
replay that stops halfway is completed by the next one, a second sync sends nothing, and
a resumed run continues the same MLflow run. Metric timestamps are the JSONL's, so a run
synced later equals one logged live.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.redact import MASK, redact
from pipeline.tracking.store import store_key, training_experiment, use_store

SYNC_STATE = "mlflow_sync.json"
# MLflow's limits per log_batch request
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_PARAM_CHARS = 1000, 100, 6000


def tag_strings(tags: dict) -> dict[str, str]:
    """MLflow tags are strings. The sqlite store coerces other types; the REST store of an
    `mlflow server` raises a TypeError while serializing them, so an int tag (world_size)
    once kept every run off every team's tracking server."""
    return {k: str(v) for k, v in tags.items()}

# The JSONL events that go to MLflow; the others (batch digests, skips, outages) are the
# JSONL's alone.
MLFLOW_EVENTS = ("run_start", "params", "tags", "artifact", "run_end", "model")


def _is_metric_record(record) -> bool:
    return isinstance(record, dict) and "step" in record and "event" not in record


def _for_mlflow(record) -> bool:
    return _is_metric_record(record) or (isinstance(record, dict) and record.get("event") in MLFLOW_EVENTS)


class SyncError(ValueError):
    """A record that cannot be sent as it is (metrics before any run_start)."""


def http_status(error: Exception) -> int:
    from mlflow.exceptions import MlflowException
    return error.get_http_status_code() if isinstance(error, MlflowException) else 0


def _refused(error: Exception) -> bool:
    """MLflow answered and refused this record (a 4xx: an invalid value, a param that
    changed), or the record cannot be sent: sending it again cannot help. Anything else
    (no answer, a 5xx, a locked sqlite file) is an outage: retried. A refusal of the
    credentials (401/403) refuses every record: it is not this record's (`denied`)."""
    status = http_status(error)
    return isinstance(error, SyncError) or (400 <= status < 500 and not denied(error))


def denied(error: Exception) -> bool:
    """The server refused who we are (401) or what we may do (403)."""
    return http_status(error) in (401, 403)

def synced_run_id(run_dir: str | Path, uri: str) -> str:
    """The MLflow run that `uri`'s store holds for this run folder ("" if none yet)."""
    path = Path(run_dir) / SYNC_STATE
    states = json.loads(path.read_text()) if path.is_file() else {}
    return states.get(store_key(uri), {}).get("run_id", "")


def recorded_tracking_uri(run_dir: str | Path) -> str:
    """The tracking URI a run was configured with (its first run_start record), or "". A
    URI that carried credentials was written without them (`***@`): the credentials then
    come from MLflow's environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN)."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        for line in f:
            if '"run_start"' in line:
                return json.loads(line).get("tracking_uri", "").replace(f"{MASK}@", "")
    return ""


class RunSync:
    """Replays one run folder's metrics.jsonl into one MLflow store, in order, from the
    first record that store has not taken yet (see the module docstring)."""

    def __init__(self, run_dir: str | Path, uri: str, adopt_run_id: str = ""):
        self.run_dir, self.uri = Path(run_dir), uri
        self.shown_uri = store_key(uri)  # what messages and files say
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.state_path = self.run_dir / SYNC_STATE
        entry = self._states().get(self.shown_uri)
        if entry is None and adopt_run_id:
            # A run folder from before the replay existed: what its JSONL holds went to
            # this run already.
            entry = {"run_id": adopt_run_id, "offset": self.jsonl.stat().st_size if self.jsonl.exists() else 0}
        entry = entry or {}
        self.run_id, self.offset = entry.get("run_id", ""), entry.get("offset", 0)
        self.resumed = bool(self.run_id)
        self.refused = 0
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _states(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def _advance(self, offset: int):
        self.offset = offset
        states = self._states()
        states[self.shown_uri] = {"run_id": self.run_id, "offset": offset}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(states, indent=1))
        os.replace(tmp, self.state_path)  # never a half-written state

    def _unsent(self):
        """(offset after it, record) for every complete line not yet sent; a torn line (a
        writer killed mid-line) is None. A line still being written is left for later."""
        if not self.jsonl.exists():
            return
        with open(self.jsonl, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        position = self.offset
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                return
            position += len(line)
            try:
                yield position, json.loads(line)
            except ValueError:
                yield position, None

    def pending(self) -> int:
        """Records for MLflow that the store has not taken yet."""
        return sum(1 for _, record in self._unsent() if _for_mlflow(record))

    def push(self) -> int:
        """Send every complete record not yet sent; returns how many went. Raises what
        MLflow raised when it does not answer: nothing is skipped, the next push resumes at
        the same record. Consecutive metric records go in one request (up to MLflow's 1000
        metrics per batch)."""
        sent, metrics, end = 0, [], self.offset
        for position, record in self._unsent():
            if _is_metric_record(record):
                new = self._metrics(record)
                if metrics and len(metrics) + len(new) > MAX_METRICS_PER_BATCH:
                    sent += self._send(self._log_metrics, metrics, end)
                    metrics = []
                metrics += new
                end = position
                continue
            if metrics:
                sent += self._send(self._log_metrics, metrics, end)
                metrics = []
            sent += self._send(self._apply, record, position)
        if metrics:
            sent += self._send(self._log_metrics, metrics, end)
        return sent

    def _send(self, action, payload, offset: int) -> int:
        try:
            action(payload)
        except Exception as e:
            if not _refused(e):
                raise
            self.refused += 1
            if self.refused <= 3:  # the first few say why; the count says how many
                print(redact(f"[tracking] MLflow at {self.shown_uri} refused a record of {self.jsonl} (before byte "
                             f"{offset}): {type(e).__name__}: {str(e)[:300]}"), flush=True)
        self._advance(offset)
        return 1

    @staticmethod
    def _metrics(record: dict) -> list:
        from mlflow.entities import Metric
        timestamp = int(record.get("time", time.time()) * 1000)
        return [Metric(k, float(v), timestamp, int(record["step"])) for k, v in record.items()
                if k not in ("step", "time") and isinstance(v, (int, float))]

    def _log_metrics(self, metrics: list):
        self._require_run("metrics")
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def _require_run(self, what: str):
        if not self.run_id:
            raise SyncError(f"{self.jsonl}: {what} before the first run_start record")

    def _apply(self, record):
        """One non-metric record (MLFLOW_EVENTS; the others are skipped)."""
        from mlflow.entities import Param, RunTag
        if not _for_mlflow(record):
            return
        kind = record["event"]
        if kind == "run_start":
            self._start(record)
            return
        self._require_run(kind)
        if kind == "params":
            params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in record["params"].items()]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH], synchronous=True)
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tag_strings(record["tags"]).items()],
                                  synchronous=True)
        elif kind == "artifact":
            if not Path(record["path"]).is_file():
                print(f"[tracking] {record['path']}: logged as an artifact but gone; not sent", flush=True)
                return
            self.client.log_artifact(self.run_id, record["path"], record.get("artifact_path"))
        elif kind == "run_end":
            self.client.set_terminated(self.run_id, record["status"], end_time=int(record["time"] * 1000))
        else:  # the final export as an MLflow Model
            if not Path(record["path"]).is_file():
                print(f"[tracking] {record['path']}: the export is gone; the model was not logged", flush=True)
                return
            import mlflow

            from pipeline.tracking.mlflow_model import log_model
            use_store(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                uri = log_model(record["path"])
            print(f"[tracking] model logged: {uri}", flush=True)

    def _start(self, record: dict):
        """The first run_start creates the run; a later one (a resumed run) reopens it."""
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        if "experiment" not in record:
            raise SyncError(f"{self.jsonl}: its run_start was written before runs could be replayed (no experiment "
                            f"name in it); such a run cannot be synced")
        experiment_id = training_experiment(self.client, record["experiment"])
        run = self.client.create_run(experiment_id, start_time=int(record["time"] * 1000),
                                     tags=tag_strings(record.get("tags", {})), run_name=record["run_name"])
        self.run_id = run.info.run_id
