"""Every recipe in launch/recipes loads, resolves its batch arithmetic for the world size
it states, and builds its model; the real-run recipes carry MS-CLIP's released settings (Hxyou/MSCLIP experiments/model/*.yaml)."""
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from pipeline.config import features_only, load_config
from pipeline.train.ds_config import fill_ds_config, read_ds_config
from pipeline.model import build_model
from pipeline.objectives import ComposedObjective, objective_arch, uses_mask_token

RECIPES = sorted((REPO_ROOT / "launch" / "recipes").glob("*.yaml"))


def stated(recipe: Path) -> tuple[int, Path]:
    """The world size and DeepSpeed config a recipe states in its header comments
    (demo recipes: 2 CPU processes with ds_configs/cpu_fp32.json)."""
    text = recipe.read_text()
    launch = re.search(r"^# launch: (\d+) nodes x (\d+) GPUs$", text, re.M)
    ds = re.search(r"^# deepspeed_config: (\S+)$", text, re.M)
    if recipe.name.startswith("demo-"):
        return 2, REPO_ROOT / "ds_configs" / "cpu_fp32.json"
    assert launch and ds, f"{recipe.name}: states no '# launch: N nodes x G GPUs' / '# deepspeed_config:' line"
    return int(launch[1]) * int(launch[2]), REPO_ROOT / ds[1]


def test_there_are_demo_and_real_run_recipes():
    names = {r.stem for r in RECIPES}
    assert {"demo-clip-tiny", "demo-msclip-s-tiny", "msclip-s-b32-yfcc", "msclip-s-b32-laion",
            "msclip-s-b16-yfcc", "clip-b32-yfcc", "declip-msclip-s-b32-yfcc", "defilip-msclip-s-b32-yfcc",
            "zerovl-msclip-s-b16-cc"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_resolves_its_batch_and_builds_its_model(recipe):
    cfg = load_config(recipe)
    world, ds_path = stated(recipe)
    ds = fill_ds_config(read_ds_config(ds_path), cfg.train, cfg.optim, world)
    assert ds["train_batch_size"] == cfg.train.global_batch_size == \
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    model = build_model(objective_arch(cfg.model.arch(), cfg.objective))
    assert model.arch == cfg.model.arch() or uses_mask_token(cfg.objective)  # MLM, ZeroVL's captions
    objective = ComposedObjective(cfg.objective, model.arch)  # the objective's heads build on this model
    assert objective.features_only == features_only(cfg.objective)  # the preflight and the step agree
    if not features_only(cfg.objective):  # the trainer refuses these with accumulation
        assert ds["gradient_accumulation_steps"] == 1
    assert cfg.optim.warmup_steps < cfg.train.steps


@pytest.mark.parametrize("name,share_lr", [("msclip-s-b32-yfcc", 1e-4), ("msclip-s-b32-laion", 1e-4),
                                           ("msclip-s-b16-yfcc", 1.6e-3)])
def test_real_msclip_recipes_follow_the_released_configs(name, share_lr):
    """Hxyou/MSCLIP experiments/model/*.yaml: lr 1e-4, wd 0.05, LR_SHARE per config, WD_SHARE 0.2, min_lr 1e-5,
    256 per GPU; 32 epochs at global 8192 on the subset the recipe names."""
    cfg = load_config(REPO_ROOT / "launch" / "recipes" / f"{name}.yaml")
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.shared_lr, o.shared_weight_decay, o.min_lr) == (1e-4, 0.05, share_lr, 0.2, 1e-5)
    assert cfg.train.micro_batch_size == 256 and cfg.model.name.startswith("msclip-s-")
    pairs = 20_000_000 if "laion" in name else 22_000_000
    assert cfg.train.steps == round(32 * pairs / cfg.train.global_batch_size)
    assert cfg.optim.warmup_steps == round(5 * pairs / cfg.train.global_batch_size)


def test_clip_baseline_recipe_differs_from_msclip_only_in_the_model():
    base = load_config(REPO_ROOT / "launch" / "recipes" / "clip-b32-yfcc.yaml")
    ms = load_config(REPO_ROOT / "launch" / "recipes" / "msclip-s-b32-yfcc.yaml")
    assert (base.train, base.data.train_shards, base.optim.lr, base.optim.weight_decay) == \
        (ms.train, ms.data.train_shards, ms.optim.lr, ms.optim.weight_decay)
    assert base.data.normalization == "imagenet" == ms.model.arch().normalization
