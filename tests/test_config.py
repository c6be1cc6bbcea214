"""Run config: layering, validation, one-line errors that name the key."""
import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, format_config,
                             load_config, save_config, to_dict)

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEPS = REPO_ROOT / "launch" / "sweeps"  # launch.sweep --list files: variants, not run configs
# run configs: every YAML under launch/ but the sweep lists and the eval suites (tests/test_suite.py)
SHIPPED = sorted(p for p in (REPO_ROOT / "launch").rglob("*.yaml")
                 if SWEEPS not in p.parents and REPO_ROOT / "launch" / "eval_suites" not in p.parents)


def test_there_are_shipped_configs():
    assert SHIPPED, "launch/ ships no YAML run configs"


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_variant_of_a_shipped_sweep_loads_and_resolves_its_model(path):
    """Each variant on the recipe its header names (launch.sweep checks this before it starts)."""
    from launch.sweep import read_list
    recipe = next(line.split("--config ")[1].split()[0] for line in path.read_text().splitlines() if "--config " in line)
    for variant in read_list(str(path)):
        load_config(REPO_ROOT / recipe, [f"{k}={v}" for k, v in variant.items()]).model.arch()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_config_loads_and_resolves_its_model(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    cfg.model.arch()


def test_layering_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 7\ntrain:\n  steps: 50\n")
    cfg = load_config(path, ["optim.lr=2e-4", "train.seed=3", "optim.betas=[0.9, 0.95]", "data.normalization=null"])
    assert cfg.optim.lr == 2e-4  # override beats YAML
    assert cfg.optim.warmup_steps == 7 and cfg.train.steps == 50  # YAML beats defaults
    assert cfg.train.seed == 3 and cfg.optim.betas == (0.9, 0.95) and cfg.data.normalization is None
    assert cfg.optim.weight_decay == OptimConfig().weight_decay  # untouched default


@pytest.mark.parametrize("override,fragment", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("model.overrides.no_such_field=1", "model.overrides.no_such_field"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.steps=0", "train.steps: 0 must be >= 1"),
    ("model.grad_checkpointing=maybe", "model.grad_checkpointing: expected true or false"),
    ("train.nan_policy=ignore", "train.nan_policy: 'ignore' is not one of"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ("optim.betas=[0.9,1.0]", "optim.betas: (0.9, 1.0) must each be in [0, 1)"),
    ("optim.betas=[-0.1,0.98]", "optim.betas: (-0.1, 0.98) must each be in [0, 1)"),
    ("optim.eps=0", "optim.eps: 0.0 must be > 0"),
    ("train.global_batch_size=48", "train.global_batch_size: 48 is not a multiple of train.micro_batch_size 32"),
    ("model.name=vit-huge", "model.name: unknown model 'vit-huge'"),
    ("model.overrides.share=everything", "model.overrides.share"),
    ("train.run_name=5", "train.run_name: expected a string"),
    ("optim.lr", "is not of the form key.sub=value"),
    ("optim=3", "optim: expected a mapping"),
    ("objective.weights.declip_typo=1", "objective.weights.declip_typo: unknown objective"),
    ("objective.weights.slip=-1", "objective.weights.slip: -1 is not a non-negative number"),
    ("objective.filip.top_k=-2", "objective.filip.top_k: -2 must be >= 0"),
    ("eval.every_steps=10", "eval.dataset: eval.every_steps is set but no dataset is named"),
    # .inf / .nan parse as floats: a setting that means neither is a config error (issue 22)
    ("optim.lr=.inf", "optim.lr: inf is not a finite number"),
    ("optim.grad_clip=.nan", "optim.grad_clip: nan is not a finite number"),
    ("train.timeout_minutes=.inf", "train.timeout_minutes: inf is not a finite number"),
    ("objective.weights.clip=.inf", "objective.weights.clip: inf is not a non-negative number"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps: -1.0 must be >= 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_yaml_names_the_full_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        load_config(path)


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    """PyYAML keeps the second of two equal keys silently (issue 22 case 5)."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: duplicate key 'lr' \(line 4\)$"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_model_overrides_change_the_architecture():
    cfg = load_config(None, ["model.name=msclip-tiny", "model.overrides.share=attn", "model.overrides.unshared_layers=2"])
    arch = cfg.model.arch()
    assert arch.share == "attn" and arch.unshared_layers == 2 and arch.vision_width == 128


def test_saved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config(next(p for p in SHIPPED if p.name == "demo-msclip-s-tiny.yaml"), ["optim.lr=3e-4", "model.overrides.share=mlp"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    text = format_config(cfg)
    assert "lr: 0.0003" in text and "share: mlp" in text


def test_every_section_validates_when_built_directly():
    with pytest.raises(ConfigError):
        DataConfig(rrc_scale=(0.9, 0.5))
    with pytest.raises(ConfigError):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError):
        TrainConfig(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError):
        ModelConfig(name="msclip-tiny", overrides={"vision_layers": 3})


def test_to_dict_covers_every_field():
    d = to_dict(RunConfig())
    for section in dataclasses.fields(RunConfig):
        assert set(d[section.name]) == {f.name for f in dataclasses.fields(getattr(RunConfig(), section.name))}
