"""Compare training runs of an MLflow experiment: a table of their sizes and final
metrics, and a plot of their loss and eval curves logged into each compared run.

    python -m eval.compare --experiment demo [--runs NAME_OR_ID ...] [--tracking-uri URI]
        [--over train.seed ...] [--no-plot] [--csv table.csv] [--group-csv groups.csv]

Store: --tracking-uri, else MLFLOW_TRACKING_URI, else runs/mlflow.db of the working folder
(the rule of every entry point). Suite aggregates (`python -m eval.suite`) show as columns.
Default runs: every training run of the experiment (runs with a `model` tag).

Runs that differ only by the params --over names (default: train.seed), wherever they were
started (a sweep or by hand), form a group: a second table shows each group's mean +- std
over its runs, and a plot with error bars is logged beside the curves. What only names or
files a run (its run name, output folder, tracking settings) is not a difference.
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
import tempfile
from pathlib import Path

from pipeline.cli import command_line
from pipeline.tracking.store import announce_store, resolve_tracking_uri, runs_page

# Headline metrics, in the order the table shows them: the final training loss, then
# the eval metrics people compare (zero-shot top-1, linear probe top-1, retrieval RSUM).
EVAL_SUFFIXES = ("/acc1", "/lp_acc1", "/rsum")
SUITE_PREFIX = "eval/suite/"  # eval/suite/<suite>/<aggregate>, from python -m eval.suite


# Params that name or file a run, and do not change what it learns or measures.
BOOKKEEPING = ("train.run_name", "train.output_dir", "tracking.")


class CompareError(ValueError):
    pass


def select_runs(client, experiment_name: str, wanted: list[str] | None):
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise CompareError(f"--experiment {experiment_name!r}: no such experiment in this store")
    # Training runs carry a `model` tag; runs that `python -m eval` opened for a bare
    # checkpoint carry one too, but also task=eval; those of released weights are the
    # reference lines (reference=true) and are shown beside the trained ones.
    runs = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
            if "model" in r.data.tags and (r.data.tags.get("task") != "eval" or r.data.tags.get("reference") == "true")]
    if wanted:
        by_key = {**{r.info.run_name: r for r in runs}, **{r.info.run_id: r for r in runs}}
        missing = [w for w in wanted if w not in by_key]
        if missing:
            raise CompareError(f"--runs: {', '.join(missing)} not in experiment {experiment_name!r}")
        runs = [by_key[w] for w in wanted]
    if not runs:
        raise CompareError(f"experiment {experiment_name!r} holds no training runs")
    return runs


def eval_metric_names(runs) -> list[str]:
    """The headline metric of every dataset, then the suites' aggregates (eval/suite/...)."""
    names = {k for r in runs for k in r.data.metrics if k.startswith("eval/") and k.endswith(EVAL_SUFFIXES)}
    suites = {k for r in runs for k in r.data.metrics if k.startswith(SUITE_PREFIX) and not k.endswith("/datasets")}
    return sorted(names - suites) + sorted(suites)


def comparison_rows(runs) -> tuple[list[str], list[list[str]]]:
    evals = eval_metric_names(runs)
    header = ["run", "kind", "model", "params (M)", "shared", "steps", "loss", *[short_name(e) for e in evals]]
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        total = p.get("params_total")
        kind = "reference" if r.data.tags.get("reference") == "true" else "trained"
        rows.append([r.info.run_name, kind, r.data.tags.get("model", ""),
                     f"{int(total) / 1e6:.2f}" if total else "", p.get("shared_fraction", ""),
                     p.get("train.steps", ""), _fmt(m.get("loss")), *[_fmt(m.get(e)) for e in evals]])
    return header, rows


def group_runs(runs, over: list[str]) -> list[list]:
    """Runs whose params agree except on `over` and on bookkeeping, in one group each, in
    the order their first run was started. A run without params (released weights'
    reference line) is a group of its own."""
    groups: dict[tuple, list] = {}
    for r in runs:
        params = r.data.params
        key = tuple(sorted((k, v) for k, v in params.items() if k not in over and not k.startswith(BOOKKEEPING)))
        groups.setdefault(key if params else ("run", r.info.run_id), []).append(r)
    return list(groups.values())


def mean_std(values) -> tuple[float | None, float | None]:
    """Over the values present (a run that did not log a metric is left out): the mean and
    the sample std (0 for one value)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def group_label(group, groups) -> str:
    """What sets this group apart: the params whose values differ between the groups."""
    first = group[0].data.params
    if not first:
        return group[0].info.run_name
    with_params = [g[0].data.params for g in groups if g[0].data.params]
    # the config's own keys first: the architecture, DeepSpeed and size params follow from them
    derived = ("arch.", "ds.", "params_", "shared_fraction", "world_size", "accumulation_steps")
    keys = sorted({k for g in with_params for k in g if not k.startswith(BOOKKEEPING)},
                  key=lambda k: (k.startswith(derived), k))
    differing = [k for k in keys if len({g.get(k) for g in with_params}) > 1 and k in first]
    if not differing:
        return group[0].data.tags.get("model", group[0].info.run_name)
    shown = ", ".join(f"{k}={first[k]}" for k in differing[:3])
    return shown + (f" (+{len(differing) - 3} more)" if len(differing) > 3 else "")


def group_rows(groups, over: list[str]) -> tuple[list[str], list[list]]:
    """One row per group: its label, size, the values of `over` it spans, and per metric
    (final loss, every headline eval metric) the mean and std over its runs."""
    runs = [r for g in groups for r in g]
    metrics = ["loss", *eval_metric_names(runs)]
    header = ["group", "runs", *over, "model", *[m if m == "loss" else short_name(m) for m in metrics]]
    rows = []
    for g in groups:
        spans = [",".join(dict.fromkeys(r.data.params.get(k, "") for r in g)) for k in over]
        stats = [mean_std([r.data.metrics.get(m) for r in g]) for m in metrics]
        rows.append([group_label(g, groups), len(g), *spans, g[0].data.tags.get("model", ""), *stats])
    return header, rows


def plus_minus(stat: tuple) -> str:
    mean, std = stat
    return "" if mean is None else f"{mean:.4f}" + (f" +- {std:.4f}" if std else "")


def short_name(metric: str) -> str:
    """eval/zeroshot/digits/acc1 -> zeroshot digits acc1"""
    return " ".join(metric.split("/")[1:])


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(client, runs, path: Path) -> Path:
    """Loss and every headline eval metric against the training step, one line per run."""
    from eval.plots import plt, save_figure
    metrics = ["loss", *eval_metric_names(runs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for r in runs:
            history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda h: h.step)
            if history:
                marker = "o" if len(history) < 20 else None
                ax.plot([h.step for h in history], [h.value for h in history], marker=marker, label=r.info.run_name)
        ax.set_title(metric if metric == "loss" else short_name(metric), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def plot_groups(header: list[str], rows: list[list], n_fixed: int, path: Path) -> Path:
    """Per metric, each group's mean with its std as the error bar."""
    from eval.plots import error_bars
    panels = {name: ([row[i][0] for row in rows], [row[i][1] for row in rows])
              for i, name in enumerate(header) if i >= n_fixed}
    return error_bars([str(row[0]) for row in rows], panels, path)


def main(argv=None) -> int:
    parser = command_line("python -m eval.compare", __doc__)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--runs", nargs="*", help="run names or ids (default: all training runs)")
    parser.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db")
    parser.add_argument("--over", nargs="+", default=["train.seed"], metavar="PARAM",
                        help="runs that differ only by these params form a group (default: train.seed)")
    parser.add_argument("--no-plot", action="store_true", help="do not log the plots")
    parser.add_argument("--csv", help="also write the table of runs here")
    parser.add_argument("--group-csv", help="also write the table of groups here (a mean and a std column each)")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient
    uri = resolve_tracking_uri(args.tracking_uri)
    announce_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        runs = select_runs(client, args.experiment, args.runs)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header, rows = comparison_rows(runs)
    print(format_table(header, rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    plots = []
    if not args.no_plot:
        plots.append(plot_curves(client, runs, Path(tempfile.mkdtemp()) / f"comparison_{args.experiment}.png"))
    groups = group_runs(runs, args.over)
    if any(len(g) > 1 for g in groups):
        g_header, g_rows = group_rows(groups, args.over)
        fixed = 3 + len(args.over)  # group, runs, the --over params, model
        print(f"\nover {', '.join(args.over)}: mean +- std of the runs that differ only by it\n"
              + format_table(g_header, [row[:fixed] + [plus_minus(c) for c in row[fixed:]] for row in g_rows]))
        if args.group_csv:
            with open(args.group_csv, "w", newline="") as f:
                csv.writer(f).writerows(
                    [g_header[:fixed] + [f"{h} {s}" for h in g_header[fixed:] for s in ("mean", "std")],
                     *[row[:fixed] + [_fmt(x) for c in row[fixed:] for x in c] for row in g_rows]])
        if not args.no_plot:
            plots.append(plot_groups(g_header, g_rows, fixed, plots[0].parent / f"groups_{args.experiment}.png"))
    for path in plots:
        for r in runs:  # visible from any of the compared runs in `mlflow ui`
            client.log_artifact(r.info.run_id, str(path), "comparison")
    if plots:
        print(f"plots: logged as {', '.join(f'comparison/{p.name}' for p in plots)} in each compared run")
    print(f"in `mlflow ui`: {runs_page(runs[0].info.experiment_id)} (select the runs, Compare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
