"""Evaluate a checkpoint on a benchmark suite: many datasets, one table, one MLflow run.

    python -m eval.suite --checkpoint runs/NAME/model.pt --suite imagenet-zs --root /data/eval \
        [--output DIR] [--training-run | --run-id ID | --experiment NAME] [--tracking-uri URI]

--suite is a shipped suite (launch/eval_suites/<name>.yaml: imagenet-zs, msclip-lp24,
retrieval, declip-zs) or a YAML file of the same form. Each dataset of the suite names its
task (zeroshot_classification, linear_probe, zeroshot_retrieval), split, and the folders
(relative to --root, or absolute, or s3:// / http(s):// URLs) it may be found in: the first
that exists is read, in CLIP_benchmark's webdataset layout, as class folders, or as a
Karpathy split json (eval/data.py). A dataset found nowhere is listed in one line and
skipped. Results: per dataset metrics and the suite's aggregates (eval/suite/<suite>/<name>)
in one MLflow run, and DIR/results.csv, DIR/results.png (default DIR: eval-<suite> beside
the checkpoint). Each finished dataset is written to DIR/datasets/ and features are cached
per weights (MSCLIP_CACHE, default ~/.cache/msclip-pipeline): the same command again, after
a kill or with a dataset added, computes only what is not done. The MLflow store:
--tracking-uri, else MLFLOW_TRACKING_URI, else (with --training-run) the store the run
recorded in its folder, else runs/mlflow.db of the working folder.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from eval.data import DatasetMissing, EvalDataError, cache_root
from eval.features import FeatureCache, weights_fingerprint
from eval.linear_probe import ProbeError
from eval.runner import (HEADLINE, TASKS, CheckpointError, add_checkpoint_arguments, add_run_arguments,
                         evaluate_dataset, mlflow_metrics, open_checkpoint, read_dataset, start_run, tracking_uri)
from pipeline.cli import command_line
from pipeline.data.remote import is_remote
from pipeline.redact import redact
from pipeline.tracking.store import announce_store

SHIPPED = Path(__file__).resolve().parents[1] / "launch" / "eval_suites"
SUITE_PREFIX = "eval/suite"  # MLflow: eval/suite/<suite>/<aggregate>


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class SuiteDataset:
    name: str
    task: str
    paths: tuple[str, ...]
    split: str = "test"
    train_split: str = "train"  # linear probe: the split the classifier is fitted on
    metric: str = ""  # the number this dataset contributes to aggregates (default: the task's headline)

    @property
    def headline(self) -> str:
        return self.metric or HEADLINE[self.task]


@dataclass
class Suite:
    name: str
    file: Path
    datasets: list[SuiteDataset]
    aggregates: dict[str, list[str]] = field(default_factory=dict)  # name -> dataset names
    description: str = ""


DATASET_KEYS = {"name", "task", "paths", "split", "train_split", "metric"}


def load_suite(name_or_file: str) -> Suite:
    """A shipped suite by name, or a suite file; every mistake is one line naming the file
    and the key."""
    path = Path(name_or_file)
    if not path.is_file():
        shipped = SHIPPED / f"{name_or_file}.yaml"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
            raise SuiteError(f"--suite {name_or_file}: neither a file nor a shipped suite ({names})")
        path = shipped
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise SuiteError(f"{path}: datasets: a list of datasets is required")
    unknown = set(raw) - {"name", "description", "datasets", "aggregates"}
    if unknown:
        raise SuiteError(f"{path}: unknown key {sorted(unknown)[0]!r} (name, description, datasets, aggregates)")
    datasets = []
    for i, d in enumerate(raw["datasets"]):
        where = f"{path}: datasets[{i}]"
        if not isinstance(d, dict):
            raise SuiteError(f"{where}: a mapping with name, task and paths is required")
        bad = set(d) - DATASET_KEYS
        if bad:
            raise SuiteError(f"{where}: unknown key {sorted(bad)[0]!r} ({', '.join(sorted(DATASET_KEYS))})")
        if not d.get("name"):
            raise SuiteError(f"{where}.name: required")
        if d.get("task") not in TASKS:
            raise SuiteError(f"{where}.task: {d.get('task')!r} is not one of {', '.join(TASKS)}")
        paths = d.get("paths") or [d["name"]]
        paths = [paths] if isinstance(paths, str) else paths
        datasets.append(SuiteDataset(str(d["name"]), d["task"], tuple(str(p) for p in paths),
                                     str(d.get("split", "test")), str(d.get("train_split", "train")),
                                     str(d.get("metric", ""))))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise SuiteError(f"{path}: datasets: {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    aggregates = {}
    for agg, members in (raw.get("aggregates") or {"mean": "all"}).items():
        members = names if members == "all" else members
        if not isinstance(members, list) or not members:
            raise SuiteError(f"{path}: aggregates.{agg}: 'all' or a list of dataset names")
        unknown = [m for m in members if m not in names]
        if unknown:
            raise SuiteError(f"{path}: aggregates.{agg}: {unknown[0]!r} is not a dataset of this suite")
        metrics = {d.headline for d in datasets if d.name in members}
        if len({d.task for d in datasets if d.name in members}) > 1 and len(metrics) > 1:
            raise SuiteError(f"{path}: aggregates.{agg}: averages different metrics ({', '.join(sorted(metrics))})")
        aggregates[str(agg)] = list(members)
    return Suite(str(raw.get("name") or path.stem), path, datasets, aggregates, str(raw.get("description", "")))


def locate(entry: SuiteDataset, root: str | None) -> str | None:
    """The first of the dataset's paths that exists (remote ones are tried when read), or None."""
    for p in entry.paths:
        if is_remote(p) or (root and is_remote(root)):
            return p if is_remote(p) else f"{root.rstrip('/')}/{p}"
        candidate = Path(p) if Path(p).is_absolute() or not root else Path(root) / p
        if candidate.exists():
            return str(candidate)
    return None


def aggregate(suite: Suite, records: dict[str, dict]) -> dict[str, dict]:
    """Each aggregate: the mean of its datasets' numbers over those evaluated, with how many
    of how many (a paper's aggregate is that paper's number only when complete)."""
    out = {}
    for name, members in suite.aggregates.items():
        values = [records[m]["metrics"][records[m]["metric"]] for m in members if m in records]
        if values:
            out[name] = {"value": sum(values) / len(values), "datasets": len(values), "of": len(members),
                         "complete": len(values) == len(members)}
    return out


@dataclass
class SuiteRun:
    """One suite on one model: evaluates what is not done yet, keeps what is."""
    suite: Suite
    root: str | None
    output: Path
    cache: FeatureCache | None
    fingerprint: str
    batch_size: int = 64
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    records: dict[str, dict] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def done_file(self, entry: SuiteDataset) -> Path:
        return self.output / "datasets" / f"{entry.name}.json"

    def finished_earlier(self, entry: SuiteDataset, location: str) -> dict | None:
        path = self.done_file(entry)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        same = (record.get("weights") == self.fingerprint and record.get("task") == entry.task
                and record.get("split") == entry.split and record.get("location") == redact(location))
        return record if same else None

    def run(self, model) -> None:
        total = len(self.suite.datasets)
        for i, entry in enumerate(self.suite.datasets, 1):
            label = f"[{i}/{total}] {entry.name} ({entry.task})"
            location = locate(entry, self.root)
            if location is None:
                self.skip(entry, label, f"not found: {', '.join(self.candidates(entry))}")
                continue
            earlier = self.finished_earlier(entry, location)
            if earlier:
                self.records[entry.name] = earlier
                self.reused.append(entry.name)
                print(f"{label}: done earlier ({self.done_file(entry)})", flush=True)
                continue
            print(f"{label}: {redact(location)}", flush=True)
            try:
                data = read_dataset(entry.task, location, entry.split, entry.train_split)
                metrics = evaluate_dataset(model, entry.task, data, self.batch_size, self.workers, self.device,
                                           self.seed, self.cache)
            except DatasetMissing as e:
                self.skip(entry, label, str(e))
                continue
            except (EvalDataError, ProbeError) as e:
                self.failed.append(entry.name)
                print(f"error: {entry.name}: {e}", file=sys.stderr, flush=True)
                continue
            for per_sample in ("predictions", "targets"):  # the table keeps numbers, not arrays
                metrics.pop(per_sample, None)
            if entry.headline not in metrics:
                raise SuiteError(f"{self.suite.file}: {entry.name}.metric: {entry.headline!r} is not a metric of "
                                 f"{entry.task} ({', '.join(metrics)})")
            record = {"dataset": entry.name, "task": entry.task, "metric": entry.headline, "metrics": metrics,
                      "split": entry.split, "location": redact(location), "weights": self.fingerprint}
            self.records[entry.name] = record
            write_json(self.done_file(entry), record)
            print(f"{label}: {entry.headline} {metrics[entry.headline]:.4f}", flush=True)

    def candidates(self, entry: SuiteDataset) -> list[str]:
        return [p if Path(p).is_absolute() or not self.root else str(Path(self.root) / p) for p in entry.paths]

    def skip(self, entry: SuiteDataset, label: str, why: str) -> None:
        self.skipped.append(entry.name)
        print(f"{label}: skipped, {why}", flush=True)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_table(run: SuiteRun, aggregates: dict, path: Path) -> Path:
    """CSV: one row per dataset (its number, then every metric), then one per aggregate."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["dataset", "task", "metric", "value", "datasets", "all_metrics"])
        for entry in run.suite.datasets:
            r = run.records.get(entry.name)
            if r is None:
                status = "skipped" if entry.name in run.skipped else "failed"
                out.writerow([entry.name, entry.task, entry.headline, "", status, ""])
            else:
                out.writerow([entry.name, entry.task, r["metric"], f"{r['metrics'][r['metric']]:.6f}", "",
                              json.dumps({k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))})])
        for name, a in aggregates.items():
            out.writerow([f"{run.suite.name}:{name}", "aggregate", "mean", f"{a['value']:.6f}",
                          f"{a['datasets']}/{a['of']}", ""])
    return path


def log_to_mlflow(run: SuiteRun, aggregates: dict, args, payload: dict, artifacts: list[Path]) -> str:
    import mlflow
    with start_run(args, payload, extra_tags={f"suite.{run.suite.name}": "evaluated"}) as mlrun:
        step = int(payload.get("step", 0))
        for r in run.records.values():
            mlflow.log_metrics(mlflow_metrics(r["task"], r["dataset"], r["metrics"]), step=step)
        suite_metrics = {f"{SUITE_PREFIX}/{run.suite.name}/{name}": a["value"] for name, a in aggregates.items()}
        suite_metrics[f"{SUITE_PREFIX}/{run.suite.name}/datasets"] = len(run.records)
        mlflow.log_metrics(suite_metrics, step=step)
        for path in artifacts:
            mlflow.log_artifact(str(path), f"eval/suite-{run.suite.name}")
        return mlrun.info.run_id


def main(argv=None) -> int:
    parser = command_line("python -m eval.suite", __doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--suite", required=True, help="a shipped suite's name or a suite YAML file")
    parser.add_argument("--root", default=os.environ.get("MSCLIP_EVAL_ROOT"),
                        help="the folder (or s3:// prefix) holding the datasets (default: MSCLIP_EVAL_ROOT)")
    parser.add_argument("--output", help="results folder (default: eval-<suite> beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="compute every feature (nothing read or written)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        suite = load_suite(args.suite)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.root and any(not Path(p).is_absolute() and not is_remote(p) for d in suite.datasets for p in d.paths):
        parser.error(f"suite {suite.name} names datasets relative to a root: give --root DIR (or MSCLIP_EVAL_ROOT)")
    if not args.no_mlflow:
        announce_store(tracking_uri(args))
    try:
        model, payload = open_checkpoint(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    fingerprint = weights_fingerprint(model)
    output = Path(args.output or Path(args.checkpoint).resolve().parent / f"eval-{suite.name}")
    cache = None if args.no_cache else FeatureCache(cache_root(), fingerprint)
    print(f"suite {suite.name}: {len(suite.datasets)} datasets from {suite.file}; results in {output}", flush=True)
    run = SuiteRun(suite, args.root, output, cache, fingerprint, args.batch_size, args.workers, device, args.seed)
    try:
        run.run(model)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    aggregates = aggregate(suite, run.records)
    for name, a in aggregates.items():
        note = "" if a["complete"] else f" (over {a['datasets']} of {a['of']} datasets: not the suite's number)"
        print(f"{suite.name} {name}: {a['value']:.4f}{note}")
    artifacts = []
    if run.records:
        from eval.plots import bar_chart
        artifacts.append(write_table(run, aggregates, output / "results.csv"))
        summary = ", ".join(f"{k} {a['value']:.3f}" for k, a in aggregates.items())
        artifacts.append(bar_chart(list(run.records.values()), output / "results.png", title=f"{suite.name}: {summary}"))
        write_json(output / "summary.json", {"suite": suite.name, "checkpoint": redact(str(args.checkpoint)),
                                             "weights": fingerprint, "aggregates": aggregates,
                                             "skipped": run.skipped, "failed": run.failed})
        artifacts.append(output / "summary.json")
        print(f"results: {output / 'results.csv'}")
    if run.records and not args.no_mlflow:
        print(f"mlflow run: {log_to_mlflow(run, aggregates, args, payload, artifacts)}")
    if run.failed:
        print(f"error: {len(run.failed)} dataset(s) failed ({', '.join(run.failed)}); the same command again "
              f"evaluates only those", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
