"""Compare training runs of an MLflow experiment: a table of their sizes and final
metrics, and a plot of their loss and eval curves logged into each compared run.

    python -m eval.compare --experiment demo [--runs NAME_OR_ID ...] [--tracking-uri URI]
        [--no-plot] [--csv table.csv]

Store: --tracking-uri, else MLFLOW_TRACKING_URI, else runs/mlflow.db of the working folder
(the rule of every entry point). Suite aggregates (`python -m eval.suite`) show as columns.
Default runs: every training run of the experiment (runs with a `model` tag).
"""
from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

from pipeline.cli import command_line
from pipeline.tracking.store import announce_store, resolve_tracking_uri, runs_page

# Headline metrics, in the order the table shows them: the final training loss, then
# the eval metrics people compare (zero-shot top-1, linear probe top-1, retrieval RSUM).
EVAL_SUFFIXES = ("/acc1", "/lp_acc1", "/rsum")
SUITE_PREFIX = "eval/suite/"  # eval/suite/<suite>/<aggregate>, from python -m eval.suite


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


def main(argv=None) -> int:
    parser = command_line("python -m eval.compare", __doc__)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--runs", nargs="*", help="run names or ids (default: all training runs)")
    parser.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db")
    parser.add_argument("--no-plot", action="store_true", help="do not log the curves plot")
    parser.add_argument("--csv", help="also write the table here")
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
    if not args.no_plot:
        path = plot_curves(client, runs, Path(tempfile.mkdtemp()) / f"comparison_{args.experiment}.png")
        for r in runs:  # visible from any of the compared runs in `mlflow ui`
            client.log_artifact(r.info.run_id, str(path), "comparison")
        print(f"curves: logged as comparison/{path.name} in each compared run")
    print(f"in `mlflow ui`: {runs_page(runs[0].info.experiment_id)} (select the runs, Compare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
