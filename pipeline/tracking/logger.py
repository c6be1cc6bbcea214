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
The replay itself, and how far each store got, is pipeline/tracking/sync.py.
"""
from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.redact import MASK, redact
from pipeline.tracking.store import resolve_tracking_uri, store_key
from pipeline.tracking.sync import RunSync, denied, http_status, tag_strings

log = logging.getLogger(__name__)

RETRY_SECONDS = (1.0, 30.0)  # first and longest wait between attempts while MLflow does not answer
POLL_SECONDS = 1.0  # how often the online replay looks for new records


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""



def _plain(value):
    if hasattr(value, "detach"):  # a tensor; read here, on log steps only (a host sync)
        # as float64: exact accumulation's loss is a float64 mean over virtual ranks, like trainer.mean_over_ranks'
        # over real ones; rounded to float32 it would log other digits on one process than on two
        return value.detach().double().item() if value.numel() == 1 else value.detach().double().tolist()
    return value


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
                if denied(e):  # retrying cannot change who we are: stop sending, keep everything
                    self._report_denied(e)
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

    def _report_denied(self, error: Exception):
        print(redact(f"[tracking] MLflow at {self.shown_uri} refused the credentials (HTTP {http_status(error)}: "
                     f"{str(error)[:150]}); training goes on, every record stays in {self.jsonl_path}: send them "
                     f"with the right credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) by "
                     f"`{self._sync_command()}`").replace("\n", " "), flush=True)
        self.event("mlflow_denied", error=f"HTTP {http_status(error)}")
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
