"""The README's main command, shortened (fewer steps, the session's demo shards), run
as written: bash launch/demo.sh. Its MLflow store is read back through the MLflow client.
It runs under the network guard (tests/network_guard: every Python process refuses and
records a connection beyond loopback), without the variables that hide telemetry in CI
and under pytest, as the demo data it reads was built (conftest.py): the whole flow, from
img2dataset on a loopback server through the launcher's ranks to eval and compare, stays
on the machine (issue 46)."""
import csv
import os
import subprocess

import pytest

from conftest import REPO_ROOT, demo_network_log, guarded_env, outbound

pytestmark = pytest.mark.slow


def checkout_state() -> dict[str, int]:
    """Every file of the checkout (ignored ones included: git would show an ignored folder
    such as mlruns/ once, not what is new in it) and its modification time; .git, .venv
    and caches aside."""
    state = {}
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache")]
        for name in files:
            path = os.path.join(folder, name)
            state[os.path.relpath(path, REPO_ROOT)] = os.stat(path).st_mtime_ns
    return state


def test_main_command_trains_evaluates_and_compares_both_variants(tmp_path, demo_data):
    from mlflow.tracking import MlflowClient
    from pipeline.model import build_model
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_data)  # built by the same data_prep.demo code
    before = checkout_state()
    network = tmp_path / "network.jsonl"
    result = subprocess.run(["bash", "launch/demo.sh", "--steps", "12", "--workdir", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1200,
                            env=guarded_env(network, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert outbound(network) == []  # MLflow's telemetry tried from every rank 0 and every eval before (issue 46)
    if not os.environ.get("MSCLIP_DEMO_DATA"):  # the session built the demo data under the guard too
        assert outbound(demo_network_log(demo_data)) == []
    # everything went under --workdir: nothing new in the checkout (artifacts landed in
    # <checkout>/mlruns before; issue 37)
    after = checkout_state()
    assert after == before, sorted(p for p in after.keys() | before.keys() if after.get(p) != before.get(p))[:10]
    store = tmp_path / "runs" / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(r.data.tags["model"] for r in runs) == ["clip-tiny", "msclip-s-tiny"]
    (table,) = list((tmp_path / "runs").glob("comparison-*.csv"))
    header, *rows = list(csv.reader(table.open()))
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    for run in runs:
        assert run.info.status == "FINISHED"
        model = run.data.tags["model"]
        assert int(run.data.params["params_total"]) == sum(p.numel() for p in build_model(model).parameters())
        history = client.get_metric_history(run.info.run_id, "eval/zeroshot/digits/acc1")
        assert {3, 6, 9, 12} <= {m.step for m in history}  # during training (every 3) and from python -m eval
        metrics = run.data.metrics
        for key in ("loss", "eval/linear_probe/digits/lp_acc1", "eval/zeroshot/digits/mean_per_class_recall"):
            assert key in metrics, (model, key)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")} | \
            {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}
        assert {"eval/confusion_digits.png", "comparison/comparison_demo.png"} <= artifacts, artifacts
        row = by_run[run.info.run_name]  # the printed comparison is what the store holds
        assert row["model"] == model and float(row["params (M)"]) == round(int(run.data.params["params_total"]) / 1e6, 2)
        assert float(row["zeroshot digits acc1"]) == pytest.approx(metrics["eval/zeroshot/digits/acc1"], abs=1e-4)
        assert float(row["linear_probe digits lp_acc1"]) == pytest.approx(metrics["eval/linear_probe/digits/lp_acc1"], abs=1e-4)
        assert run.info.run_name in out
