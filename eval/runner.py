"""What `python -m eval` and `python -m eval.suite` share: loading the model evaluated,
reading and evaluating one dataset on one task, and the MLflow run the results go into."""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

from eval import linear_probe, retrieval, zeroshot
from eval.data import read_classification, read_retrieval
from eval.features import FeatureCache
from pipeline.weights.interop import InteropError
from pipeline.weights.load import load_checkpoint
from pipeline.redact import redact
from pipeline.tracking.store import resolve_tracking_uri, store_key, training_experiment, use_store
from pipeline.tracking.sync import recorded_tracking_uri, synced_run_id

# CLIP_benchmark's task names; the MLflow metric prefix of each (eval/<prefix>/<dataset>/<metric>)
METRIC_PREFIX = {"zeroshot_classification": "zeroshot", "linear_probe": "linear_probe",
                 "zeroshot_retrieval": "retrieval"}
TASKS = tuple(METRIC_PREFIX)
# The number a dataset contributes to tables and aggregates, per task (a suite may name another)
HEADLINE = {"zeroshot_classification": "acc1", "linear_probe": "lp_acc1", "zeroshot_retrieval": "rsum"}


class CheckpointError(Exception):
    """The checkpoint to evaluate cannot be loaded; the message is one line naming it."""


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """What `open_checkpoint` reads: the checkpoint, and how to import released weights."""
    parser.add_argument("--checkpoint", required=True, help="model.pt, a run's checkpoints/, or released weights "
                                                            "with --format")
    parser.add_argument("--format", choices=("ours", "msclip", "openai", "open_clip"), default="ours",
                        help="released weights, imported on the fly; the run is tagged reference=true")
    parser.add_argument("--model", help="with --format: the model to build (msclip-s-b32, clip-b32, ...)")
    parser.add_argument("--source", help="with --format openai/open_clip: the open_clip model name")


def open_checkpoint(args) -> tuple:
    """(model, payload) of --checkpoint (with --format, --model and --source for released
    weights), and with --training-run the MLflow run its results go into; the one opening
    of `python -m eval` and `python -m eval.suite`."""
    try:
        model, payload = load_checkpoint(args.checkpoint, args.format, args.model, args.source)
        resolve_training_run(args, payload)
    except (FileNotFoundError, InteropError) as e:
        raise CheckpointError(str(e)) from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{args.checkpoint}: refusing to load: it holds more than weights (weights-only "
                              f"loading)") from None
    return model, payload


def read_dataset(task: str, root: str | Path, split: str = "test", train_split: str = "train"):
    """The data one task reads: a ClassificationSet, (train, test) ClassificationSets for
    the linear probe, or a RetrievalSet."""
    if task == "linear_probe":
        return read_classification(root, train_split), read_classification(root, split)
    if task == "zeroshot_retrieval":
        return read_retrieval(root, split)
    return read_classification(root, split)


def evaluate_dataset(model, task: str, data, batch_size: int, workers: int, device: str, seed: int = 0,
                     cache: FeatureCache | None = None) -> dict:
    """CLIP_benchmark-style metrics of one dataset (zero-shot also returns its predictions
    and targets, for the confusion matrix)."""
    if task == "linear_probe":
        train, test = data
        return linear_probe.evaluate(model, train, test, batch_size, workers, device, seed=seed, cache=cache)
    if task == "zeroshot_retrieval":
        return retrieval.evaluate(model, data, batch_size, workers, device, cache=cache)
    return zeroshot.evaluate(model, data, batch_size, workers, device, cache=cache)


def mlflow_metrics(task: str, dataset: str, metrics: dict) -> dict[str, float]:
    return {f"eval/{METRIC_PREFIX[task]}/{dataset}/{k.replace('@', '_at_')}": float(v)
            for k, v in metrics.items() if isinstance(v, (int, float))}


# ---- which MLflow run receives the results ---------------------------------------------------

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--training-run", action="store_true", help="log into the run that trained the checkpoint")
    target.add_argument("--run-id", help="log into this run")
    parser.add_argument("--experiment", default="eval", help="experiment of a new run (without --run-id)")
    parser.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else (--training-run) the "
                                                           "store the run recorded, else ./runs/mlflow.db")
    parser.add_argument("--no-mlflow", action="store_true")


def run_folder(checkpoint: str) -> Path:
    """The run folder of a run's export or checkpoints/ (runs/NAME/model.pt, runs/NAME/checkpoints -> runs/NAME)."""
    return Path(checkpoint).resolve().parent


def tracking_uri(args) -> str:
    """The store rule of every entry point (pipeline/tracking/store.py), with one step more
    for --training-run: the store the training run recorded in its run folder comes before
    the working folder's runs/mlflow.db, which is not it when eval runs from another
    folder or the run trained into another train.output_dir (issue 44)."""
    if args.training_run and not args.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        folder = run_folder(args.checkpoint)
        try:
            recorded = recorded_tracking_uri(folder) if (folder / "metrics.jsonl").is_file() else ""
        except (OSError, ValueError):  # an unreadable or torn JSONL: the rule's next step
            recorded = ""
        if recorded:
            return recorded
    return resolve_tracking_uri(args.tracking_uri)


def resolve_training_run(args, payload: dict) -> None:
    """--training-run: the run this store holds for the run folder (runs/NAME/model.pt ->
    runs/NAME; an offline run synced later has one), else the run the export names; checked
    in the store before any evaluation, so that hours of it never end at start_run."""
    if not args.training_run:
        return
    uri = tracking_uri(args)
    args.run_id = synced_run_id(run_folder(args.checkpoint), uri) or payload.get("mlflow_run_id") or None
    if not args.run_id:
        raise FileNotFoundError(f"--training-run: {args.checkpoint} names no MLflow run (exported without one)")
    if not args.no_mlflow:
        check_run_exists(uri, args.run_id)


def check_run_exists(uri: str, run_id: str) -> None:
    """One line, before any work, when the store is not there or does not hold the run."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FileNotFoundError(f"--training-run: the store {store_key(uri)} does not exist; name the run's store "
                                f"with --tracking-uri")
    from mlflow.tracking import MlflowClient
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 (not found, refused, unreachable: each one line)
        raise FileNotFoundError(f"--training-run: run {run_id} is not in {store_key(uri)} "
                                f"({str(e).strip().splitlines()[0][:200]})") from None


def start_run(args, payload: dict, extra_tags: dict | None = None):
    """The MLflow run the results go into: --run-id / --training-run's, else a new one
    tagged with the checkpoint (reference=true for released weights)."""
    import mlflow
    use_store(tracking_uri(args))
    if args.run_id:
        run = mlflow.start_run(run_id=args.run_id)
        if extra_tags:
            mlflow.set_tags(redact(extra_tags))
        return run
    experiment_id = training_experiment(mlflow.MlflowClient(), args.experiment)
    tags = {"checkpoint": str(Path(args.checkpoint).resolve()), "task": "eval",
            "model": payload.get("model_name", ""), **(extra_tags or {})}
    source = payload.get("source")
    if source:  # released weights (imported here or by `python -m pipeline.weights import`)
        tags.update(reference="true", source_format=source["format"], source_sha256=source["sha256"],
                    source_file=source["file"])
    return mlflow.start_run(run_name=f"{'reference' if source else 'eval'}-{payload.get('model_name', 'model')}",
                            experiment_id=experiment_id, tags=redact(tags))
