"""Ablation sweeps in one command: every combination of the values given (x seeds) trained
through the real deepspeed launcher, one after another, each evaluated as the demo does,
all nested under one MLflow parent run that holds the summary.

    python -m launch.sweep --config RECIPE --deepspeed_config DS \
        [--grid key=v1,v2 ...] [--list variants.yaml] [--seeds 0,1,2] [--name NAME] \
        [--select key=v1,v2 --by METRIC] [--eval DATASET] [--procs 2] [--set key=value ...] [--print]

Variants are the cross product of the --grid values, times the entries of --list (a YAML
list of {key: value} mappings, or of {name:, overrides: {key: value}}), times --seeds
(train.seed). With --select (a learning-rate sweep, say), every variant first runs each of
its values at the first seed; the value with the best --by metric (the highest; the lowest
for loss) is the variant's, and only it runs the other seeds. Each child is
`train.run_name=NAME-NN[-J]-sSEED` with
`tracking.parent_run_id=<parent>` (MLflow's parentRunId tag: `mlflow ui` folds the children
under the parent). The parent holds summary.csv (per variant: mean and std over seeds of
the final loss and every headline eval metric, parameters and shared fraction), runs.csv
(per child), summary.png and curves.png.

The sweep's state is `<train.output_dir>/NAME/sweep.json`. Run the same command with the
same --name again after an interruption: finished children are kept, the one that was
running resumes from its checkpoint (train.resume=latest), the rest start. --print
creates the parent run and prints each child's commands for a scheduler instead.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from launch.demo import free_port
from pipeline.cli import command_line
from pipeline.redact import redact

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE = "sweep.json"


class SweepError(ValueError):
    pass


# ---- the variants -----------------------------------------------------------------------

def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"--grid {item!r}: write it as key.sub=value1,value2")
        grid.append((key.strip(), [v.strip() for v in values.split(",")]))
    return grid


def read_list(path: str) -> list[dict[str, str]]:
    """--list: [{key: value}, ...] or [{name: ..., overrides: {key: value}}, ...]."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"--list {path}: {e}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
        raise SweepError(f"--list {path}: a YAML list of mappings of config keys to values is expected")
    variants = []
    for entry in entries:
        overrides = entry.get("overrides", entry) if set(entry) <= {"name", "overrides"} else entry
        variants.append({str(k): yaml_value(v) for k, v in overrides.items()})
    return variants


def yaml_value(value) -> str:
    """A value as the launcher's key=value override reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)


def variants(grid: list[tuple[str, list[str]]], listed: list[dict[str, str]]) -> list[dict[str, str]]:
    keys = [k for k, _ in grid]
    crossed = [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]
    return [{**entry, **combo} for entry in (listed or [{}]) for combo in crossed]


def label(overrides: dict[str, str]) -> str:
    """share=none lr=1e-3: the last part of each key (the table's and the plot's name)."""
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


# ---- the state ----------------------------------------------------------------------------

def plan(name: str, variant_list: list[dict[str, str]], seeds: list[int],
         select: tuple[str, list[str]] | None) -> list[dict]:
    """The children known before any has run: every variant x seed, or with --select every
    variant x selected value at the first seed (the other seeds follow the choice)."""
    if select is None:
        return [child(f"{name}-{i:02d}-s{seed}", i, overrides, seed) for i, overrides in enumerate(variant_list)
                for seed in seeds]
    key, values = select
    return [child(f"{name}-{i:02d}-{j}-s{seeds[0]}", i, {**overrides, key: value}, seeds[0])
            for i, overrides in enumerate(variant_list) for j, value in enumerate(values)]


def child(run_name: str, variant: int, overrides: dict[str, str], seed: int) -> dict:
    return {"run_name": run_name, "variant": variant, "overrides": overrides, "seed": seed, "done": False}


def choose(state: dict, runs: dict, select: tuple[str, list[str]], metric: str, seeds: list[int]):
    """After the first seed: each variant's best --select value, and its runs of the other
    seeds (appended to the plan)."""
    key, values = select
    state["selected"] = {}
    for variant in sorted({c["variant"] for c in state["children"]}):
        tried = [c for c in state["children"] if c["variant"] == variant]
        scored = [(runs[c["run_name"]].data.metrics.get(metric), c) for c in tried if c["run_name"] in runs]
        scored = [(v, c) for v, c in scored if v is not None and math.isfinite(v)]
        if not scored:
            raise SweepError(f"--by {metric}: none of variant {variant}'s runs logged it")
        _, best = (min if metric == "loss" else max)(scored, key=lambda vc: vc[0])
        state["selected"][str(variant)] = best["overrides"][key]
        j = values.index(best["overrides"][key])
        followers = [child(f"{state['name']}-{variant:02d}-{j}-s{seed}", variant, best["overrides"], seed)
                     for seed in seeds[1:]]
        for c in (best, *followers):
            c["chosen"] = True
        state["children"] += followers


def load_or_start(sweep_dir: Path, name: str, children: list[dict], start_parent) -> dict:
    """The sweep's state: sweep.json if this sweep ran before (its plan must match), else a
    new one with a new parent run."""
    path = sweep_dir / STATE
    if path.is_file():
        state = json.loads(path.read_text())
        planned = [(c["run_name"], c["overrides"], c["seed"]) for c in state["children"][:len(children)]]
        # the file holds the overrides without credentials (save_state): compare them so
        if planned != [(c["run_name"], redact(c["overrides"]), c["seed"]) for c in children]:
            raise SweepError(f"--name {name}: {path} holds a sweep of other variants or seeds; give this one "
                             f"another --name")
        for saved, child in zip(state["children"], children):  # the launches use the real values
            saved["overrides"] = child["overrides"]
        return state
    state = {"name": name, "parent_run_id": start_parent(), "children": children}
    save_state(sweep_dir, state)
    return state


def save_state(sweep_dir: Path, state: dict):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f"{STATE}.tmp"
    tmp.write_text(json.dumps(redact(state), indent=1))  # a signed URL in an override stays in memory
    os.replace(tmp, sweep_dir / STATE)


# ---- the commands -------------------------------------------------------------------------

def train_command(args, child: dict, parent_run_id: str) -> list[str]:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    return [deepspeed, "--num_gpus", str(args.procs), "--master_port", str(free_port()), "launch/train.py",
            "--deepspeed_config", args.deepspeed_config, "--config", args.config, *args.set,
            *(f"{k}={v}" for k, v in child["overrides"].items()), f"train.seed={child['seed']}",
            f"train.run_name={child['run_name']}", "train.resume=latest", f"tracking.parent_run_id={parent_run_id}"]


def eval_command(args, child: dict, output_dir: Path, tracking_uri: str) -> list[str]:
    return [sys.executable, "-m", "eval", "--checkpoint", str(output_dir / child["run_name"] / "model.pt"),
            "--zeroshot", *args.eval, "--linear-probe", *args.eval, "--training-run", "--tracking-uri", tracking_uri]


def run(cmd: list[str], what: str):
    print(f"\n== {what}\n$ {shlex.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SweepError(f"{what} failed (exit {result.returncode}); run the same command again to resume the sweep")


# ---- the summary --------------------------------------------------------------------------

def child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, object]:
    """run name -> its newest run under the parent (a child restarted from scratch has an
    older, unfinished one too)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"])
    return {r.info.run_name: r for r in runs}


def summarize(state: dict, runs: dict, out_dir: Path) -> tuple[Path, Path]:
    """runs.csv (one row per child) and summary.csv (per variant: mean and std over seeds)."""
    from eval.compare import eval_metric_names, mean_std, short_name
    finished = [(c, runs[c["run_name"]]) for c in counted(state) if c["run_name"] in runs]
    metrics = ["loss", *eval_metric_names([r for _, r in finished])]
    names = [m if m == "loss" else short_name(m) for m in metrics]
    per_child = [["run", "variant", "seed", "params (M)", "shared", *names]]
    groups: dict[int, list] = {}
    for child, r in finished:
        total = r.data.params.get("params_total")
        described = [label(child["overrides"]), f"{int(total) / 1e6:.2f}" if total else "",
                     r.data.params.get("shared_fraction", "")]
        values = [r.data.metrics.get(m) for m in metrics]
        per_child.append([child["run_name"], described[0], child["seed"], *described[1:], *map(fmt, values)])
        groups.setdefault(child["variant"], [described, []])[1].append(values)
    summary = [["variant", "seeds", "params (M)", "shared", *(f"{n} {s}" for n in names for s in ("mean", "std"))]]
    for _, (described, rows) in sorted(groups.items()):
        cells = [fmt(x) for column in zip(*rows) for x in mean_std(column)]
        summary.append([described[0], len(rows), *described[1:], *cells])
    paths = out_dir / "runs.csv", out_dir / "summary.csv"
    for path, table in zip(paths, (per_child, summary)):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(table)
    return paths


def counted(state: dict) -> list[dict]:
    """The children the summary is over: all, or with --select each variant's chosen value's."""
    return [c for c in state["children"] if "selected" not in state or c.get("chosen")]


def fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def summary_plot(summary_csv: Path, path: Path) -> Path:
    """Per headline metric, each variant's mean with its std over seeds as the error bar."""
    from eval.plots import error_bars
    with open(summary_csv) as f:
        header, *rows = list(csv.reader(f))
    metrics = [h[:-len(" mean")] for h in header if h.endswith(" mean")]
    column = lambda name: [float(r[header.index(name)]) if r[header.index(name)] else None for r in rows]
    panels = {m: (column(f"{m} mean"), column(f"{m} std")) for m in metrics}
    return error_bars([r[0] for r in rows], panels, path)


def finish(client, state: dict, experiment_id: str, sweep_dir: Path):
    """The summary into the parent run (artifacts, and per-variant mean/std metrics)."""
    from eval.compare import plot_curves
    runs = child_runs(client, experiment_id, state["parent_run_id"])
    runs_csv, summary_csv = summarize(state, runs, sweep_dir)
    parent = state["parent_run_id"]
    for path in (runs_csv, summary_csv, summary_plot(summary_csv, sweep_dir / "summary.png")):
        client.log_artifact(parent, str(path), "sweep")
    children = [runs[c["run_name"]] for c in counted(state) if c["run_name"] in runs]
    if children:
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifact(parent, str(plot_curves(client, children, Path(tmp) / "curves.png")), "sweep")
    with open(summary_csv) as f:
        header, *rows = list(csv.reader(f))
    for i, row in enumerate(rows):
        client.log_param(parent, f"variant_{i:02d}", row[0])
        for name, cell in zip(header[4:], row[4:]):
            if cell:  # MLflow metric names: letters, digits, _ - . / and spaces
                client.log_metric(parent, f"variant_{i:02d}/{name.replace('@', '_at_')}", float(cell))
    client.set_terminated(parent, "FINISHED")
    print(f"\n{summary_csv.read_text()}\nsweep {state['name']}: {len(children)} runs under parent run {parent}; "
          f"summary.csv, runs.csv, summary.png and curves.png logged to it", flush=True)


# ---- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = command_line("python -m launch.sweep", __doc__)
    parser.add_argument("--config", required=True, help="the recipe every child starts from")
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--list", help="a YAML list of override sets (one variant each)")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    parser.add_argument("--select", metavar="KEY=V1,V2",
                        help="each variant's best of these values (at the first seed) runs the other seeds")
    parser.add_argument("--by", help="the metric --select maximizes (loss: minimizes); default: the first --eval "
                                     "dataset's zero-shot top-1")
    parser.add_argument("--name", help="the sweep's name (default sweep-<time>); the same name resumes it")
    parser.add_argument("--eval", nargs="+", default=[], metavar="DATASET",
                        help="zero-shot and linear-probe datasets evaluated after each child")
    parser.add_argument("--procs", type=int, default=2, help="processes per child (deepspeed --num_gpus)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every child")
    parser.add_argument("--print", action="store_true", help="print the children's commands, run nothing")
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError, load_config
    try:
        if not args.grid and not args.list:
            raise SweepError("give --grid KEY=V1,V2 and/or --list FILE: the sweep has no variants")
        seeds = [int(s) for s in args.seeds.split(",")]
        variant_list = variants(parse_grid(args.grid), read_list(args.list) if args.list else [])
        select = parse_grid([args.select])[0] if args.select else None
        if select and not (args.by or args.eval):
            raise SweepError("--select needs --by METRIC or an --eval dataset (whose zero-shot top-1 it then uses)")
        by = args.by or (f"eval/zeroshot/{Path(args.eval[0]).name}/acc1" if args.eval else "")
        tried = [{}] if select is None else [{select[0]: value} for value in select[1]]
        for overrides in variant_list:  # every child's config is valid before the first one starts
            for extra in tried:
                load_config(args.config, [*args.set, *(f"{k}={v}" for k, v in {**overrides, **extra}.items())])
        cfg = load_config(args.config, args.set)
    except (SweepError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import announce_store, resolve_tracking_uri, runs_page, training_experiment
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(cfg.train.output_dir).resolve()
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, output_dir)
    announce_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = training_experiment(client, cfg.tracking.experiment)
    sweep_dir = output_dir / name

    def start_parent() -> str:
        run = client.create_run(experiment_id, run_name=name, tags={
            "sweep": name, "sweep_grid": " ".join(args.grid), "sweep_list": args.list or "", "seeds": args.seeds,
            "recipe": args.config})
        return run.info.run_id
    try:
        state = load_or_start(sweep_dir, name, plan(name, variant_list, seeds, select), start_parent)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parent = state["parent_run_id"]
    if args.print:
        if select:
            print(f"# --select: each variant's best of {select[0]} by {by} at seed {seeds[0]} then runs the other "
                  f"seeds: run `python -m launch.sweep` with the same arguments after these to plan them", flush=True)
        for c in state["children"]:
            print(shlex.join(train_command(args, c, parent)))
            if args.eval:
                print(shlex.join(eval_command(args, c, output_dir, tracking_uri)))
        return 0
    client.update_run(parent, status="RUNNING")  # again, when a sweep resumes
    try:
        while True:
            for c in state["children"]:
                if c["done"]:
                    print(f"== {c['run_name']}: finished before, kept", flush=True)
                    continue
                run(train_command(args, c, parent), f"train {c['run_name']} ({label(c['overrides'])}, "
                                                    f"seed {c['seed']})")
                if args.eval:
                    run(eval_command(args, c, output_dir, tracking_uri), f"evaluate {c['run_name']}")
                c["done"] = True
                save_state(sweep_dir, state)
            if not select or "selected" in state:
                break
            choose(state, child_runs(client, experiment_id, parent), select, by, seeds)
            save_state(sweep_dir, state)
            print(f"== {select[0]} chosen by {by}: {state['selected']}", flush=True)
    except SweepError as e:
        client.set_terminated(parent, "FAILED")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        client.set_terminated(parent, "KILLED")
        raise
    finish(client, state, experiment_id, sweep_dir)
    print(f"in `mlflow ui`: {runs_page(experiment_id)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
