"""Evaluate a checkpoint and log every metric to MLflow.

    python -m eval --checkpoint runs/NAME/model.pt --zeroshot data/demo/eval/digits \
        [--linear-probe data/demo/eval/digits] [--retrieval PATH] \
        [--training-run | --run-id ID | --experiment NAME] [--tracking-uri URI] [--output results.json]

--checkpoint is an exported file (`model.pt`, weights-only) or a run's DeepSpeed
checkpoints/ directory (exported on the fly); with --format msclip|openai|open_clip and
--model (and --source for open_clip) a released file, imported on the fly, whose run is
tagged reference=true with the file's sha256 (`python -m eval.compare` shows it beside
the trained runs). The MLflow store: --tracking-uri, else MLFLOW_TRACKING_URI, else (with
--training-run) the store the run recorded in its folder, else runs/mlflow.db of the
working folder. Metrics go into the run that trained the
checkpoint with --training-run (its MLflow id is in the export), into run ID with
--run-id, else into a new run tagged with the checkpoint; they are logged at the
checkpoint's training step. Writes a JSON of
results (CLIP_benchmark's keys where they overlap) and logs it with a confusion matrix
(for up to 30 classes) and a bar chart of the per-dataset results as artifacts.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from eval.data import EvalDataError
from eval.plots import bar_chart, confusion_matrix
from eval.runner import (CheckpointError, add_checkpoint_arguments, add_run_arguments, evaluate_dataset,
                         mlflow_metrics, open_checkpoint, read_dataset, start_run, tracking_uri)
from pipeline.cli import command_line
from pipeline.redact import redact
from pipeline.tracking.store import announce_store

MAX_CONFUSION_CLASSES = 30


def run_tasks(model, args, device: str) -> tuple[list[dict], dict[str, Path]]:
    """Every requested task on every dataset -> CLIP_benchmark-style result records, plots."""
    results, artifacts = [], {}
    plot_dir = Path(tempfile.mkdtemp())
    for task, roots in (("zeroshot_classification", args.zeroshot), ("linear_probe", args.linear_probe),
                        ("zeroshot_retrieval", args.retrieval)):
        for root in roots or []:
            data = read_dataset(task, root, args.split)
            metrics = evaluate_dataset(model, task, data, args.batch_size, args.workers, device, args.seed)
            name = data[1].name if task == "linear_probe" else data.name
            results.append({"dataset": name, "task": task, "metrics": metrics})
            if task == "zeroshot_classification":
                preds, targets = metrics.pop("predictions"), metrics.pop("targets")
                if len(data.classnames) <= MAX_CONFUSION_CLASSES:
                    artifacts[f"confusion_{name}.png"] = confusion_matrix(
                        targets, preds, data.classnames, plot_dir / f"confusion_{name}.png", title=f"zero-shot {name}")
    if results:
        artifacts["results_by_dataset.png"] = bar_chart(results, plot_dir / "results_by_dataset.png")
    return results, artifacts


def log_to_mlflow(results: list[dict], artifacts: dict, args, payload: dict, results_path: Path) -> str:
    import mlflow
    with start_run(args, payload) as run:
        step = int(payload.get("step", 0))
        for r in results:
            mlflow.log_metrics(mlflow_metrics(r["task"], r["dataset"], r["metrics"]), step=step)
        mlflow.log_artifact(str(results_path), "eval")
        for path in artifacts.values():
            mlflow.log_artifact(str(path), "eval")
        return run.info.run_id


def main(argv=None) -> int:
    parser = command_line("python -m eval", __doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--zeroshot", nargs="*", metavar="DATASET", help="classification dataset roots")
    parser.add_argument("--linear-probe", nargs="*", metavar="DATASET", help="roots with train/ and test/ splits")
    parser.add_argument("--retrieval", nargs="*", metavar="DATASET", help="Karpathy json or webdataset roots")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser)
    parser.add_argument("--output", help="results JSON (default: next to the checkpoint)")
    parser.add_argument("--similarity", choices=("auto", "pooled", "token"), default="auto",
                        help="zero-shot/retrieval similarity: pooled embeddings, or FILIP's token-wise one "
                             "(auto: what the run trained, from the export)")
    args = parser.parse_args(argv)
    if not (args.zeroshot or args.linear_probe or args.retrieval):
        parser.error("name at least one task: --zeroshot, --linear-probe or --retrieval")
    if not args.no_mlflow:
        announce_store(tracking_uri(args))
    try:
        model, payload = open_checkpoint(args)
        if args.similarity != "auto":
            if args.similarity == "token" and model.token_heads is None:
                raise FileNotFoundError(f"--similarity token: {args.checkpoint} has no FILIP heads "
                                        f"(exports keep them when the run trained FILIP)")
            model.similarity = args.similarity
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        results, artifacts = run_tasks(model, args, device)
    except (CheckpointError, EvalDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
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
