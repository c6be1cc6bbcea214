"""Tracking: the store rule (store.py), the metrics logger of a run (logger.py: a local
JSONL, replayed into MLflow), the replay itself and its CLI (sync.py, __main__.py:
`python -m pipeline.tracking sync`), and the trained model as an MLflow Model
(mlflow_model.py)."""
import os

# Set before any module of the package imports MLflow (its client reads them once). Fail
# fast instead of retrying inside one request: RunSync retries, without blocking anyone.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
