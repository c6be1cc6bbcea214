"""One metrics logger, rank 0 only: a local JSONL file, replayed into MLflow.

The JSONL (`<run dir>/metrics.jsonl`) is the record of truth: every param, tag, metric,
artifact and status change is written there first, synchronously, and nothing in the
training step waits on the network. MLflow is fed from it by `RunSync`, which sends the
records in order from where the store last stopped taking them:
* `tracking.mode=online` (default): a background thread replays the file as it grows.
  When the server does not answer it retries with backoff (the outage is reported once),
  and when the server is back the records of the outage go in order: a ten-second blip
  at hour 2 of a 3-day run costs MLflow nothing. At the end of the run the logger waits
  up to `tracking.flush_seconds` for what is unsent and names the command that sends
  the rest.
* `tracking.mode=offline` (compute nodes with no route to the server): no MLflow at all;
  `python -m pipeline.tracking sync runs/NAME [--tracking-uri URI]` replays a run, or
  every run of a folder, afterwards.
How far each store got (its run id and the byte offset reached) is kept per tracking URI
in `<run dir>/mlflow_sync.json`, written after every batch the store accepted, so a
replay that stops halfway is completed by the next one, a second sync sends nothing, and
a resumed run continues the same MLflow run. Metric timestamps are the JSONL's, so a run
synced later equals one logged live.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.redact import MASK, redact, redact_output

log = logging.getLogger(__name__)

# Fail fast instead of retrying inside one request: RunSync retries, without blocking anyone.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")

SYNC_STATE = "mlflow_sync.json"
RETRY_SECONDS = (1.0, 30.0)  # first and longest wait between attempts while MLflow does not answer
POLL_SECONDS = 1.0  # how often the online replay looks for new records
# MLflow's limits per log_batch request
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_PARAM_CHARS = 1000, 100, 6000


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


def tag_strings(tags: dict) -> dict[str, str]:
    """MLflow tags are strings. The sqlite store coerces other types; the REST store of an
    `mlflow server` raises a TypeError while serializing them, so an int tag (world_size)
    once kept every run off every team's tracking server."""
    return {k: str(v) for k, v in tags.items()}


def _plain(value):
    if hasattr(value, "detach"):  # a tensor; read here, on log steps only (a host sync)
        # as float64: exact accumulation's loss is a float64 mean over virtual ranks, like trainer.mean_over_ranks'
        # over real ones; rounded to float32 it would log other digits on one process than on two
        return value.detach().double().item() if value.numel() == 1 else value.detach().double().tolist()
    return value


# The JSONL events that go to MLflow; the others (batch digests, skips, outages) are the
# JSONL's alone.
MLFLOW_EVENTS = ("run_start", "params", "tags", "artifact", "run_end", "model")


def _is_metric_record(record) -> bool:
    return isinstance(record, dict) and "step" in record and "event" not in record


def _for_mlflow(record) -> bool:
    return _is_metric_record(record) or (isinstance(record, dict) and record.get("event") in MLFLOW_EVENTS)


class SyncError(ValueError):
    """A record that cannot be sent as it is (metrics before any run_start)."""


def _http_status(error: Exception) -> int:
    from mlflow.exceptions import MlflowException
    return error.get_http_status_code() if isinstance(error, MlflowException) else 0


def _refused(error: Exception) -> bool:
    """MLflow answered and refused this record (a 4xx: an invalid value, a param that
    changed), or the record cannot be sent: sending it again cannot help. Anything else
    (no answer, a 5xx, a locked sqlite file) is an outage: retried. A refusal of the
    credentials (401/403) refuses every record: it is not this record's (`_denied`)."""
    status = _http_status(error)
    return isinstance(error, SyncError) or (400 <= status < 500 and not _denied(error))


def _denied(error: Exception) -> bool:
    """The server refused who we are (401) or what we may do (403)."""
    return _http_status(error) in (401, 403)


def store_key(uri: str) -> str:
    """How a tracking URI is written down (the sync state, the JSONL): without its
    credentials (pipeline/redact.py)."""
    return redact(uri)


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

            from pipeline.mlflow_model import log_model
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


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: TrackingConfig, output_dir: str | Path, run_name: str,
                 enabled: bool = True, run_id: str = "", tags: dict | None = None):
        self.enabled = enabled  # False on ranks other than 0: every method is a no-op
        self._run_id = run_id
        self.sync = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._lock = threading.Lock()  # the replay thread writes outage events too
        self.uri = resolve_tracking_uri(cfg.tracking_uri, output_dir)
        self.shown_uri = store_key(self.uri)  # the URI itself (credentials and all) stays in memory
        self.cfg = cfg
        if cfg.mode == "online":
            self.sync = RunSync(self.run_dir, self.uri, adopt_run_id=run_id)  # before this run's records
        self.starts_before = self._count_starts()  # > 0: this is a restart of the run
        self.event("run_start", tracking_uri=self.uri, mode=cfg.mode, experiment=cfg.experiment, run_name=run_name,
                   tags=tag_strings({"git_commit": git_commit(), **(tags or {})}))
        if self.sync:
            self._closing, self._wake = threading.Event(), threading.Event()
            self._down, self._system_metrics, self._was_denied = False, None, False
            self._thread = threading.Thread(target=self._replay, name="mlflow-replay", daemon=True)
            self._thread.start()

    def _count_starts(self) -> int:
        if not self.jsonl_path.exists():
            return 0
        with open(self.jsonl_path, "rb") as f:
            return sum(1 for line in f if b'"event": "run_start"' in line)

    @property
    def run_id(self) -> str:
        """The MLflow run, once the store has created it ("" before, and offline)."""
        return self.sync.run_id if self.sync else self._run_id

    # ---- the online replay (a background thread) ------------------------------------
    def _replay(self):
        delay = RETRY_SECONDS[0]
        while True:
            closing = self._closing.is_set()  # read first: the last push then sees run_end
            try:
                self.sync.push()
            except Exception as e:  # no answer: retry later, never lose or reorder a record
                if _denied(e):  # retrying cannot change who we are: stop sending, keep everything
                    self._denied(e)
                    return
                self._unreachable(e)
                time.sleep(delay)
                delay = min(2 * delay, RETRY_SECONDS[1])
                continue
            delay = RETRY_SECONDS[0]
            if self._down:
                self._down = False
                print(f"[tracking] MLflow at {self.shown_uri} answers again: the records of the outage were sent",
                      flush=True)
                self.event("mlflow_recovered")
            self._start_system_metrics()
            if closing:
                return
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _denied(self, error: Exception):
        print(redact(f"[tracking] MLflow at {self.shown_uri} refused the credentials (HTTP {_http_status(error)}: "
                     f"{str(error)[:150]}); training goes on, every record stays in {self.jsonl_path}: send them "
                     f"with the right credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) by "
                     f"`{self._sync_command()}`").replace("\n", " "), flush=True)
        self.event("mlflow_denied", error=f"HTTP {_http_status(error)}")
        self._was_denied = True

    def _unreachable(self, error: Exception):
        if self._down:
            return
        self._down = True
        msg = (f"MLflow at {self.shown_uri} is unavailable ({type(error).__name__}: {str(error)[:200]}); training goes "
               f"on, metrics stay in {self.jsonl_path} and are sent when it answers")
        msg = redact(msg)
        log.warning(msg, exc_info=error)
        print(f"[tracking] {msg}", flush=True)
        self.event("mlflow_unavailable", error=f"{type(error).__name__}: {str(error)[:500]}")

    def _start_system_metrics(self):
        """MLflow's own sampler (CPU, memory, GPU) logs straight to the store, not through
        the JSONL: what it samples during an outage is lost."""
        if self.cfg.system_metrics and self._system_metrics is None and self.run_id:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self._system_metrics = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri,
                                                        resume_logging=self.sync.resumed)
            self._system_metrics.start()

    # ---- what the trainer calls -------------------------------------------------------
    def event(self, name: str, **fields):
        self._write({"event": name, "time": time.time(), **fields})

    def _write(self, record: dict):
        """Every record, hence everything MLflow gets (replayed from here), without credentials."""
        if self.enabled:
            with self._lock, open(self.jsonl_path, "a") as f:
                f.write(json.dumps(redact(record)) + "\n")

    def log_params(self, params: dict):
        self.event("params", params=params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        self.event("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: dict):
        self.event("tags", tags=tag_strings(tags))

    def log_metrics(self, metrics: dict, step: int):
        """Tensors are read here (a host sync), so call this on log steps only."""
        if not self.enabled:
            return
        values = {k: _plain(v) for k, v in metrics.items() if v is not None}
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self._write({"step": step, "time": time.time(), **values})

    def log_model(self, exported: str | Path):
        """The final export as an MLflow Model of this run (`tracking.log_model`), sent after
        the run has closed (the export exists only then); offline, or with MLflow away, the
        sync command sends it later (the export stays on disk either way)."""
        if not self.enabled:
            return
        self.event("model", path=str(Path(exported).resolve()))
        if self.sync and not self._thread.is_alive():
            try:
                self.sync.push()
                return
            except Exception as e:  # noqa: BLE001 (a failing server must not fail a finished run)
                print(redact(f"[tracking] the model was not logged ({type(e).__name__}: {str(e)[:200]})"), flush=True)
        print(f"[tracking] {exported} is logged as a model by `{self._sync_command()}`", flush=True)

    def close(self, status: str = "FINISHED"):
        if not self.enabled:
            return
        self.event("run_end", status=status)
        if self.sync:
            if self._system_metrics is not None:
                self._system_metrics.finish()
            self._closing.set()
            self._wake.set()
            self._thread.join(self.cfg.flush_seconds)
        self._hint_unsent()

    def _sync_command(self) -> str:
        return f"python -m pipeline.tracking sync {self.run_dir} --tracking-uri {self.shown_uri.replace(f'{MASK}@', '')}"

    def _hint_unsent(self):
        if not self.sync:
            print(f"[tracking] offline run: send it to MLflow with `{self._sync_command()}`", flush=True)
        elif self.sync.pending() and not self._was_denied:  # a refusal said it once already
            print(f"[tracking] {self.sync.pending()} records of {self.jsonl_path} are not in MLflow yet "
                  f"({self.shown_uri} did not take them in tracking.flush_seconds={self.cfg.flush_seconds:g}); "
                  f"send them with `{self._sync_command()}`", flush=True)


# ---- python -m pipeline.tracking sync ----------------------------------------------------

def run_folders(path: Path) -> list[Path]:
    """`path` itself if it is a run folder, else the run folders directly inside it."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    return sorted(d for d in path.iterdir() if (d / "metrics.jsonl").is_file()) if path.is_dir() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="replay runs' metrics.jsonl into MLflow (idempotent, resumable)")
    sync.add_argument("path", type=Path, help="a run folder (runs/NAME) or a folder of runs (runs/)")
    sync.add_argument("--tracking-uri", help="default: the URI each run was configured with")
    args = parser.parse_args(argv)
    redact_output()
    folders = run_folders(args.path)
    if not folders:
        print(f"error: {args.path}: no metrics.jsonl in it or in the folders directly inside it", file=sys.stderr)
        return 2
    failed = 0
    for folder in folders:
        uri = args.tracking_uri or recorded_tracking_uri(folder) or resolve_tracking_uri("", folder.parent)
        announce_store(uri)
        replay = RunSync(folder, uri)
        try:
            sent = replay.push()
        except Exception as e:  # noqa: BLE001 (one line per run; the others still go)
            failed += 1
            print(f"error: {folder}: MLflow at {uri} did not take it ({type(e).__name__}: {str(e)[:300]}); "
                  f"run the same command again to continue", file=sys.stderr)
            continue
        refused = f", {replay.refused} refused (see above)" if replay.refused else ""
        print(f"{folder}: {sent} records sent to {uri}, run {replay.run_id or '-'}{refused}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
