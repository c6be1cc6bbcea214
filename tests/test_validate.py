"""What launch/train.py checks before any process group starts (issue 22 case 5): each
bad input is one ConfigError/ValueError line naming the key, raised by `validate` in
this process (the launcher-level test of the same path is tests/test_train_e2e.py)."""
import json

import pytest
import yaml

from launch.train import main, parse_args, validate
from pipeline.config import ConfigError

from conftest import REPO_ROOT


def args_for(tmp_path, demo_data, *overrides):
    cfg = {"model": {"name": "msclip-s-tiny"},
           "data": {"train_shards": f"{demo_data}/shards/digits", "workers": 2, "resampled": False},
           "train": {"global_batch_size": 32, "micro_batch_size": 16, "steps": 4,
                     "output_dir": str(tmp_path / "runs"), "run_name": "r"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return parse_args(["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"), "--config", str(path),
                       *overrides])


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_a_valid_config_passes(tmp_path, demo_data, two_ranks):
    cfg, _, world, _, initial = validate(args_for(tmp_path, demo_data))
    assert world == 2 and cfg.data.resampled is False and initial is None


def test_a_batch_that_a_ranks_share_of_the_epoch_cannot_fill(tmp_path, demo_data, two_ranks):
    """It passed validation and the run hung: without resampling a rank reads only its
    shards (the digits: 6 shards of up to 250 samples over 2 ranks x 2 workers)."""
    with pytest.raises(ConfigError, match=r"^train.micro_batch_size: a batch of 256 per rank cannot be filled .*"
                                          r"2 rank\(s\) x 2 worker\(s\)"):
        validate(args_for(tmp_path, demo_data, "train.micro_batch_size=256", "train.global_batch_size=512"))
    validate(args_for(tmp_path, demo_data, "train.micro_batch_size=256", "train.global_batch_size=512",
                      "data.resampled=true"))  # resampled readers draw from every shard: fine


def test_an_unwritable_output_dir(tmp_path, demo_data, two_ranks):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, even by root
    with pytest.raises(ConfigError, match=f"^train.output_dir: {blocker}/runs is not writable"):
        validate(args_for(tmp_path, demo_data, f"train.output_dir={blocker}/runs"))


def test_a_resume_path_that_is_no_checkpoint_or_one_of_another_world_size(tmp_path, demo_data, two_ranks):
    with pytest.raises(FileNotFoundError, match="^train.resume: .*nowhere is not a complete checkpoint"):
        validate(args_for(tmp_path, demo_data, f"train.resume={tmp_path}/nowhere"))
    tag = tmp_path / "runs" / "r" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "COMPLETE.json").write_text(json.dumps({"world_size": 4, "step": 4}))
    with pytest.raises(ValueError, match="^train.resume: .*step_00000004 was written by 4 ranks, this run has 2"):
        validate(args_for(tmp_path, demo_data, "train.resume=latest"))


def test_main_says_it_in_one_line_and_returns_2(tmp_path, demo_data, two_ranks, capsys):
    assert main(["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"),
                 "--config", str(args_for(tmp_path, demo_data).config), "train.micro_batch_size=256",
                 "train.global_batch_size=512"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.micro_batch_size:") and "\n" not in err
