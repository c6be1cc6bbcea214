"""Evaluate a checkpoint and log every metric to MLflow.

    python -m eval --checkpoint runs/NAME/model.pt --zeroshot data/demo/eval/digits \
        [--linear-probe data/demo/eval/digits] [--retrieval PATH] \
        [--training-run | --run-id ID | --experiment NAME] [--tracking-uri URI] [--output results.json]

--checkpoint is an exported file (`model.pt`, weights-only) or a run's DeepSpeed
checkpoints/ directory (exported on the fly); with --format msclip|openai|open_clip and
--model (and --source for open_clip) a released file, imported on the fly, whose run is
tagged reference=true with the file's sha256 (`python -m eval.compare` shows it beside
the trained runs). Metrics go into the run that trained the
checkpoint with --training-run (its MLflow id is in the export), into run ID with
--run-id, else into a new run tagged with the checkpoint; they are logged at the
checkpoint's training step. Writes a JSON of
results (CLIP_benchmark's keys where they overlap) and logs it with a confusion matrix
(for up to 30 classes) and a bar chart of the per-dataset results as artifacts.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from eval import linear_probe, retrieval, zeroshot
from eval.data import EvalDataError, read_classification, read_retrieval
from eval.plots import bar_chart, confusion_matrix
from pipeline.checkpoint import export, load_exported
from pipeline.interop import InteropError
from pipeline.redact import redact, redact_output
from pipeline.tracking import default_tracking_uri, synced_run_id, training_experiment

MAX_CONFUSION_CLASSES = 30


def load_checkpoint(path: str, fmt: str = "ours", model_name: str | None = None, source: str | None = None):
    """Our export or a run's checkpoints/; with `fmt` msclip/openai/open_clip, a released
    file imported on the fly (pipeline/interop.py)."""
    if fmt != "ours":
        from pipeline.checkpoint import model_from_payload
        from pipeline.interop import import_weights
        if not model_name:
            raise FileNotFoundError(f"--format {fmt}: name the model to build with --model (e.g. msclip-s-b32)")
        payload, _ = import_weights(path, fmt, model_name, source)
        return model_from_payload(payload), payload
    path = Path(path)
    if path.is_dir():  # a DeepSpeed checkpoints/ directory: consolidate first
        tmp = Path(tempfile.mkdtemp()) / "model.pt"
        export(path, tmp)
        path = tmp
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    return load_exported(path)


def run_tasks(model, args, device: str) -> tuple[list[dict], dict[str, Path]]:
    """Every requested task on every dataset -> CLIP_benchmark-style result records, plots."""
    results, artifacts = [], {}
    plot_dir = Path(tempfile.mkdtemp())
    for root in args.zeroshot or []:
        data = read_classification(root, args.split)
        metrics = zeroshot.evaluate(model, data, args.batch_size, args.workers, device)
        preds, targets = metrics.pop("predictions"), metrics.pop("targets")
        results.append({"dataset": data.name, "task": "zeroshot_classification", "metrics": metrics})
        if len(data.classnames) <= MAX_CONFUSION_CLASSES:
            artifacts[f"confusion_{data.name}.png"] = confusion_matrix(
                targets, preds, data.classnames, plot_dir / f"confusion_{data.name}.png", title=f"zero-shot {data.name}")
    for root in args.linear_probe or []:
        train, test = read_classification(root, "train"), read_classification(root, args.split)
        metrics = linear_probe.evaluate(model, train, test, args.batch_size, args.workers, device, seed=args.seed)
        results.append({"dataset": test.name, "task": "linear_probe", "metrics": metrics})
    for root in args.retrieval or []:
        data = read_retrieval(root, args.split)
        results.append({"dataset": data.name, "task": "zeroshot_retrieval",
                        "metrics": retrieval.evaluate(model, data, args.batch_size, args.workers, device)})
    if results:
        artifacts["results_by_dataset.png"] = bar_chart(results, plot_dir / "results_by_dataset.png")
    return results, artifacts


def tracking_uri(args) -> str:
    return args.tracking_uri or default_tracking_uri(Path(args.checkpoint).resolve().parents[1])


def log_to_mlflow(results: list[dict], artifacts: dict, args, payload: dict, results_path: Path) -> str:
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(args))
    if args.run_id:
        run = mlflow.start_run(run_id=args.run_id)
    else:
        experiment_id = training_experiment(mlflow.MlflowClient(), args.experiment)
        tags = {"checkpoint": str(Path(args.checkpoint).resolve()), "task": "eval",
                "model": payload.get("model_name", "")}
        source = payload.get("source")
        if source:  # released weights (imported here or by `python -m pipeline.checkpoint import`)
            tags.update(reference="true", source_format=source["format"], source_sha256=source["sha256"],
                        source_file=source["file"])
        run = mlflow.start_run(run_name=f"{'reference' if source else 'eval'}-{payload.get('model_name', 'model')}",
                               experiment_id=experiment_id, tags=redact(tags))
    with run:
        step = int(payload.get("step", 0))
        for r in results:
            prefix = {"zeroshot_classification": "zeroshot", "linear_probe": "linear_probe",
                      "zeroshot_retrieval": "retrieval"}[r["task"]]
            mlflow.log_metrics({f"eval/{prefix}/{r['dataset']}/{k.replace('@', '_at_')}": float(v)
                                for k, v in r["metrics"].items()}, step=step)
        mlflow.log_artifact(str(results_path), "eval")
        for path in artifacts.values():
            mlflow.log_artifact(str(path), "eval")
        return run.info.run_id


def main(argv=None) -> int:
    redact_output()  # what this prints (URLs of stores and datasets) goes without credentials
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--zeroshot", nargs="*", metavar="DATASET", help="classification dataset roots")
    parser.add_argument("--linear-probe", nargs="*", metavar="DATASET", help="roots with train/ and test/ splits")
    parser.add_argument("--retrieval", nargs="*", metavar="DATASET", help="Karpathy json or webdataset roots")
    parser.add_argument("--format", choices=("ours", "msclip", "openai", "open_clip"), default="ours",
                        help="released weights, imported on the fly; the run is tagged reference=true")
    parser.add_argument("--model", help="with --format: the model to build (msclip-s-b32, clip-b32, ...)")
    parser.add_argument("--source", help="with --format openai/open_clip: the open_clip model name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--training-run", action="store_true", help="log into the run that trained the checkpoint")
    target.add_argument("--run-id", help="log into this run")
    parser.add_argument("--experiment", default="eval", help="experiment of a new run (without --run-id)")
    parser.add_argument("--tracking-uri", help="default: the sqlite store next to the run folders")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--output", help="results JSON (default: next to the checkpoint)")
    parser.add_argument("--similarity", choices=("auto", "pooled", "token"), default="auto",
                        help="zero-shot/retrieval similarity: pooled embeddings, or FILIP's token-wise one "
                             "(auto: what the run trained, from the export)")
    args = parser.parse_args(argv)
    if not (args.zeroshot or args.linear_probe or args.retrieval):
        parser.error("name at least one task: --zeroshot, --linear-probe or --retrieval")
    try:
        model, payload = load_checkpoint(args.checkpoint, args.format, args.model, args.source)
        if args.training_run:
            # the run this store holds for the run folder (runs/NAME/model.pt -> runs/NAME;
            # an offline run synced later has one), else the run the export names
            args.run_id = (synced_run_id(Path(args.checkpoint).resolve().parent, tracking_uri(args))
                           or payload.get("mlflow_run_id") or None)
            if not args.run_id:
                raise FileNotFoundError(f"--training-run: {args.checkpoint} names no MLflow run (exported without one)")
        if args.similarity != "auto":
            if args.similarity == "token" and model.token_heads is None:
                raise FileNotFoundError(f"--similarity token: {args.checkpoint} has no FILIP heads "
                                        f"(exports keep them when the run trained FILIP)")
            model.similarity = args.similarity
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        results, artifacts = run_tasks(model, args, device)
    except (EvalDataError, FileNotFoundError, InteropError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError:
        print(f"error: {args.checkpoint}: refusing to load: it holds more than weights (weights-only loading)",
              file=sys.stderr)
        return 2
    results_path = Path(args.output or Path(args.checkpoint).resolve().with_name("eval_results.json"))
    for r in results:
        r.update(model=payload.get("model_name", ""), checkpoint=str(args.checkpoint), step=payload.get("step"),
                 similarity=model.similarity)
    results_path.write_text(json.dumps(redact(results), indent=2))
    for r in results:
        shown = {k: round(v, 4) for k, v in r["metrics"].items() if isinstance(v, float)}
        print(f"{r['task']:<24} {r['dataset']:<16} {shown}")
    print(f"results: {results_path}")
    if not args.no_mlflow:
        run_id = log_to_mlflow(results, artifacts, args, payload, results_path)
        print(f"mlflow run: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
