"""What launch/train.py checks before any process group starts (issue 22 case 5): each
bad input is one ConfigError/ValueError line naming the key, raised by `validate` in
this process (the launcher-level test of the same path is tests/test_train_e2e.py)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from launch.train import main, parse_args, validate
from pipeline.config import ConfigError

from conftest import REPO_ROOT, free_port


def args_for(tmp_path, demo_data, *overrides):
    cfg = {"model": {"name": "msclip-s-tiny"},
           "data": {"train_shards": f"{demo_data}/shards/digits", "workers": 2, "resampled": False, "readers": 4},
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
    plan, evaluator, initial = validate(args_for(tmp_path, demo_data))
    assert plan.world == 2 and plan.accum == 1 and plan.cfg.data.resampled is False and initial is None
    assert evaluator is None and plan.resume is None
    # what preflight resolved, handed on: the shards with the manifest's counts, the read policy
    assert len(plan.sources) == 1 and plan.sources[0].total_samples > 0
    assert plan.read.timeout == plan.cfg.data.read_timeout_seconds


def test_a_batch_that_the_readers_of_an_epoch_cannot_fill(tmp_path, demo_data, two_ranks):
    """It passed validation and the run hung: without resampling an epoch lasts as long as
    its least-fed virtual reader (the digits: 6 shards of up to 250 samples over 4 readers;
    the least-fed holds 250, 237 usable: 4 x 237 < 1024)."""
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: a global batch of 1024 cannot be filled .*"
                                          r"4 virtual readers"):
        validate(args_for(tmp_path, demo_data, "train.micro_batch_size=512", "train.global_batch_size=1024"))
    validate(args_for(tmp_path, demo_data, "train.micro_batch_size=512", "train.global_batch_size=1024",
                      "data.resampled=true"))  # resampled readers draw from every shard: fine
    with pytest.raises(ConfigError, match=r"^data.readers=8 virtual readers but 6 shards"):
        validate(args_for(tmp_path, demo_data, "data.readers=8"))
    with pytest.raises(ConfigError, match=r"^data.readers=3 is not a multiple of the world size 2: it runs on 1, 3"):
        validate(args_for(tmp_path, demo_data, "data.readers=3"))


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
    (tag / "COMPLETE.json").write_text(json.dumps({"world_size": 4, "step": 4}))  # written before data.readers
    with pytest.raises(ValueError, match="^train.resume: .*step_00000004 was written by 4 ranks, this run has 2: "
                                         "checkpoints saved before data.readers"):
        validate(args_for(tmp_path, demo_data, "train.resume=latest"))
    facts = {"model.name": "msclip-s-tiny", "model.overrides": {}, "objective.weights": ["clip"],
             "data.readers": 8, "train.global_batch_size": 32, "zero_optimization.stage": 2}
    (tag / "COMPLETE.json").write_text(json.dumps({"world_size": 4, "step": 4, "facts": facts}))
    with pytest.raises(ValueError, match="^train.resume: .*step_00000004 was written with data.readers=8, this run "
                                         "has data.readers=4"):
        validate(args_for(tmp_path, demo_data, "train.resume=latest"))
    (tag / "COMPLETE.json").write_text(json.dumps({"world_size": 4, "step": 4,
                                                   "facts": {**facts, "data.readers": 4}}))
    plan, *_ = validate(args_for(tmp_path, demo_data, "train.resume=latest"))  # 4 ranks -> 2: converted at load
    # found once, handed to the trainer with its record (which decides the conversion)
    assert plan.resume == (tag.parent, tag.name, json.loads((tag / "COMPLETE.json").read_text()))


def test_main_says_it_in_one_line_and_returns_2(tmp_path, demo_data, two_ranks, capsys):
    assert main(["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"),
                 "--config", str(args_for(tmp_path, demo_data).config), "train.micro_batch_size=512",
                 "train.global_batch_size=1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.global_batch_size:") and "\n" not in err


def test_auto_micro_batch_without_a_gpu_is_one_line(tmp_path, demo_data, two_ranks, capsys):
    """train.micro_batch_size=auto probes a CUDA GPU for the largest micro batch that fits;
    this machine has none (tests never need one): rc 2 and one line naming the key."""
    assert main(["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"),
                 "--config", str(args_for(tmp_path, demo_data).config), "train.micro_batch_size=auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.micro_batch_size=auto: ") and "no" in err and "\n" not in err
    with pytest.raises(ConfigError, match="^train.micro_batch_size: expected an integer, got 'biggest'"):
        validate(args_for(tmp_path, demo_data, "train.micro_batch_size=biggest"))


# ---- the bad-config corpus: one line, rc 2, before torch / DeepSpeed / MLflow load --------

IMPORTS_WATCHED = ("torch", "deepspeed", "mlflow")

CHECK_IN_A_FRESH_INTERPRETER = """
import contextlib, io, json, sys
from launch.train import main, parse_args, validate
cases, watched, results = json.loads(sys.argv[1]), sys.argv[3].split(","), []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"rc": rc, "stderr": err.getvalue(), "loaded": [m for m in watched if m in sys.modules]})
validate(parse_args(json.loads(sys.argv[2])))  # a good config goes on to the checks that need them
results.append({"loaded": [m for m in watched if m in sys.modules]})
print(json.dumps(results))
"""


def test_bad_configs_fail_in_one_line_before_torch_deepspeed_or_mlflow_is_imported(tmp_path, demo_data):
    """Issue 18 item 4: validation ran after torch and DeepSpeed were imported (~15 s for a
    typo). Each case runs through launch/train.py's main in one fresh interpreter, in
    which none of torch, DeepSpeed or MLflow may have been imported when it fails; the
    last, valid, config shows that the check sees an import when there is one."""
    good = args_for(tmp_path, demo_data)
    ds_base = json.loads((REPO_ROOT / "ds_configs" / "cpu_fp32.json").read_text())
    ds_owned, ds_stage = tmp_path / "owned.json", tmp_path / "stage.json"
    ds_owned.write_text(json.dumps({**ds_base, "train_batch_size": 64}))
    ds_stage.write_text(json.dumps({**ds_base, "zero_optimization": {"stage": 7}}))
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- optim\n- train\n")
    (tmp_path / "a-file").write_text("")
    corpus = [
        (["optim.lr=-1"], "optim.lr: "),
        (["optim.lr=.inf"], "optim.lr: inf is not a finite number"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay: "),
        (["optim.betas=[0.9, 1.0]"], "optim.betas: "),
        (["train.steps=0"], "train.steps: 0 must be >= 1"),
        (["train.micro_batch_size=0"], "train.micro_batch_size: "),
        (["train.global_batch_size=48"], "train.global_batch_size: 48 is not a multiple"),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        ([f"train.output_dir={tmp_path}/a-file/runs"], "train.output_dir: "),
        (["eval.every_steps=5", "eval.dataset=/nonexistent"], "eval.dataset: /nonexistent: no such dataset directory"),
        (["data.train_shards=/nonexistent/{00000..00003}.tar"], "data.train_shards: shard /nonexistent/00000.tar"),
        ([f"train.resume={tmp_path}/nowhere"], "train.resume: "),
        (["objective.weights.slip=1", "train.global_batch_size=64"], "objective.weights: slip (with its views)"),
        (['data.http_headers={Authorization: "Bearer ${env:NO_SUCH_TOKEN_VAR}"}'],
         "data.http_headers.Authorization: ${env:NO_SUCH_TOKEN_VAR} is not set in the environment"),
        (["data.http_headers={X-Key: [1, 2]}"], "data.http_headers.X-Key: a header is a name and a one-line string"),
        # remote shards (nothing listens there: their optional manifest is refused at once)
        ([f"data.train_shards=http://127.0.0.1:{free_port()}/{{00000..00003}}.tar", "data.resampled=true",
          "data.train_num_samples=1000", "data.read_retries=0", "data.stall_seconds=30"],
         "data.stall_seconds: 30 s is shorter than one remote shard's read budget, 60 s"),
        (["--config", str(not_a_mapping)], f"{not_a_mapping}: the top level must be a mapping"),
        (["--deepspeed_config", str(ds_owned)], f"{ds_owned}: 'train_batch_size' belongs in the run config"),
        (["--deepspeed_config", str(ds_stage)], f"{ds_stage}: zero_optimization.stage: 7 is not a ZeRO stage"),
    ]
    base = ["--deepspeed_config", str(good.deepspeed_config), "--config", str(good.config)]
    argvs = []
    for extra, _ in corpus:
        if extra[0] in ("--config", "--deepspeed_config"):  # replaces the good file
            argv = list(base)
            argv[argv.index(extra[0]) + 1] = extra[1]
            argvs.append(argv)
        else:
            argvs.append(base + extra)
    done = subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_INTERPRETER, json.dumps(argvs),
                           json.dumps(base), ",".join(IMPORTS_WATCHED)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    *results, control = json.loads(done.stdout.strip().splitlines()[-1])
    for (extra, message), result in zip(corpus, results):
        lines = result["stderr"].strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), (extra, result)
        assert result["loaded"] == [], (extra, result["loaded"])
    assert set(control["loaded"]) >= {"torch", "deepspeed"}


def test_a_warmup_longer_than_the_run_is_said_not_refused(tmp_path, demo_data, two_ranks, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    plan, *_ = validate(args_for(tmp_path, demo_data, "optim.warmup_steps=100"))  # a 4-step run
    assert plan.cfg.optim.warmup_steps == 100
    err = capsys.readouterr().err
    assert "optim.warmup_steps=100 is longer than the run (train.steps=4): the learning rate peaks at 0.04 x " \
           "optim.lr" in err, err
    monkeypatch.setenv("RANK", "1")  # said once, by rank 0
    validate(args_for(tmp_path, demo_data, "optim.warmup_steps=100"))
    assert "warmup" not in capsys.readouterr().err


def test_under_torchrun_the_run_is_named_by_its_rendezvous_id(tmp_path, demo_data, monkeypatch):
    """Issue 44: train.resume=auto under torchrun needed train.run_name as well; every node
    and every restart of a job share its rendezvous id (--rdzv-id), which now names the run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1234")
    plan, *_ = validate(args_for(tmp_path, demo_data, "train.run_name=", "train.resume=auto"))
    assert plan.cfg.train.run_name == "job-1234"
    assert validate(args_for(tmp_path, demo_data))[0].cfg.train.run_name == "r"  # a name given wins
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without a rendezvous id
    with pytest.raises(ConfigError, match="train.resume=auto needs train.run_name"):
        validate(args_for(tmp_path, demo_data, "train.run_name=", "train.resume=auto"))
