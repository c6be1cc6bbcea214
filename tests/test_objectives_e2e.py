"""SLIP, FILIP, DeCLIP, DeFILIP, PyramidCLIP and ZeroVL (mixup + debiased sampling) train
msclip-s-tiny through the real deepspeed launcher, 2 processes, ZeRO-2: the total loss
falls, every component loss is in the MLflow run, and the export holds the encoders only."""
import math
import shutil

import pytest

from conftest import REPO_ROOT
from test_train_e2e import launch, run_config, step_losses

pytestmark = pytest.mark.slow
SMALL_HEADS = {"slip": {"mlp_dim": 256, "out_dim": 64}, "filip": {"dim": 64, "top_k": 8}}


# DeCLIP as its paper (sec. 3.2) and Sense-GVT/DeCLIP's yfcc15m config give it: 2 MoCo image views x (caption, EDA caption), weights
# 0.4 / 0.2 / 0.2 / 0.2, the scale clamped to [3, ln 100]; DeFILIP adds FILIP at 0.2.
DECLIP = {"weights": {"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2}, "image_views": 2,
          "view_augment": "moco", "text_eda": True, "logit_scale_min": 3.0}
DEFILIP = {**DECLIP, "weights": {**DECLIP["weights"], "filip": 0.2}}


# The wiring of each objective through the launcher: the loader's views for it, its
# heads in the engine, its parts logged, its export. That each one learns is
# test_objectives.py's one-step property. PyramidCLIP: global/local crops, summary
# (built-in fallback), caption, and the YFCC-style tags the demo stores in each sample's
# .json. ZeroVL: coin-flipping mixup, and debiased sampling over two equal sources (the
# photos and a second copy of them, "{photos_copy}"); which source each step takes is
# tested on its own in test_pyramid_zerovl.py.
PYRAMID = {"weights": {"pyramid": 1.0}}
ZEROVL = {"weights": {"mixup": 1.0}}
PHOTOS = {"train_shards": "{demo}/shards/photos"}


@pytest.mark.parametrize("objective,data", [({"weights": {"clip": 1.0, "slip": 1.0}}, {}),
                                            ({"weights": {"filip": 1.0}}, PHOTOS), (DECLIP, {}), (DEFILIP, {}),
                                            (PYRAMID, PHOTOS),
                                            (ZEROVL, {"sampling": "debiased",
                                                      "train_shards": "{demo}/shards/photos::{photos_copy}"})],
                         ids=["slip", "filip", "declip", "defilip", "pyramidclip", "zerovl"])
def test_objective_trains_through_the_launcher(tmp_path, demo_data, objective, data):
    from mlflow.tracking import MlflowClient
    from pipeline.weights.export import load_exported
    weights = objective["weights"]
    name = "-".join(weights)
    photos_copy = tmp_path / "photos_copy"
    if "{photos_copy}" in data.get("train_shards", ""):
        shutil.copytree(demo_data / "shards" / "photos", photos_copy)
    config = run_config(tmp_path, demo_data, name, train={"steps": 12, "log_every": 4, "save_every": 12},
                        objective={**objective, **SMALL_HEADS},
                        data={k: v.format(demo=demo_data, photos_copy=photos_copy) if isinstance(v, str) else v
                              for k, v in data.items()})
    launch(config, REPO_ROOT / "ds_configs" / "cpu_fp32.json")
    run_dir = tmp_path / "runs" / name
    losses = step_losses(run_dir)  # that the objective learns: test_objectives.py's one-step property
    assert sorted(losses) == [4, 8, 12] and all(math.isfinite(v) for v in losses.values()), losses
    assert len(set(losses.values())) > 1, losses  # the weights move

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert sorted(run.data.tags["objective"].split("+")) == sorted(weights)
    if not set(weights) <= {"pyramid", "mixup"}:  # these two have no heads
        assert int(run.data.params["params_objective_heads"]) > 0
    parts = [*weights, *(["pyramid_peer", "pyramid_cross"] if "pyramid" in weights else [])]
    for term in parts:
        history = client.get_metric_history(run.info.run_id, f"loss_{term}")
        assert sorted(m.step for m in history) == [4, 8, 12], term
    assert run.data.params["data.sampling"] == data.get("sampling", "mixed")
    model, payload = load_exported(run_dir / "model.pt")  # strict load: no training heads in the export
    # FILIP's token heads travel with the export; FILIP alone is evaluated token-wise
    assert (model.token_heads is not None) == ("filip" in weights)
    assert payload["similarity"] == ("token" if set(weights) == {"filip"} else "pooled")
    if "mlm" in weights:  # the mask token's embedding row travels with the text tower
        assert model.arch.vocab_size == model.text.token_embedding.weight.shape[0] == 49409
    if "logit_scale_min" in objective:  # DeCLIP's lower clamp (init ln(1/0.07) < 3 is raised at once)
        scales = [m.value for m in client.get_metric_history(run.info.run_id, "logit_scale")]
        assert scales and min(scales) >= math.exp(objective["logit_scale_min"]) * (1 - 1e-5), scales
