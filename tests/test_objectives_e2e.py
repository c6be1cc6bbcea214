"""SLIP and FILIP (alone and with CLIP) train msclip-s-tiny through the real deepspeed
launcher, 2 processes, ZeRO-2: the total loss falls, every component loss is in the
MLflow run, and the export holds the encoders only."""
import pytest

from conftest import REPO_ROOT
from test_train_e2e import launch, run_config, step_losses

pytestmark = pytest.mark.slow
SMALL_HEADS = {"slip_mlp_dim": 256, "slip_out_dim": 64, "filip_dim": 64, "filip_top_k": 8}


@pytest.mark.parametrize("weights", [{"clip": 1.0, "slip": 1.0}, {"filip": 1.0}, {"clip": 1.0, "filip": 0.2}],
                         ids=["slip", "filip", "clip+filip"])
def test_objective_trains_through_the_launcher(tmp_path, demo_data, weights):
    from mlflow.tracking import MlflowClient
    from pipeline.checkpoint import load_exported
    name = "-".join(weights)
    config = run_config(tmp_path, demo_data, name, train={"steps": 30, "log_every": 5, "save_every": 30},
                        objective={"weights": weights, **SMALL_HEADS})
    launch(config, REPO_ROOT / "ds_configs" / "cpu_fp32.json")
    run_dir = tmp_path / "runs" / name
    losses = step_losses(run_dir)
    assert losses[30] + losses[25] < losses[5] + losses[10] - 0.1, losses

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.data.tags["objective"] == "+".join(weights)
    assert int(run.data.params["params_objective_heads"]) > 0
    for term in weights:
        history = client.get_metric_history(run.info.run_id, f"loss_{term}")
        assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30], term
    model, _ = load_exported(run_dir / "model.pt")  # strict load: no head weights in the export
    assert not hasattr(model, "objective_heads")
