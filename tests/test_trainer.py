"""The training loop in this process, world size 1, no launcher (issue 16 item 3): the
loop lives in pipeline/trainer.py, so its resume property is tested in seconds here; the
launcher tests (tests/test_train_e2e.py) keep the wiring of real processes."""
import json
import signal

import pytest

from conftest import REPO_ROOT, free_port
from pipeline.config import load_config
from pipeline.ds_config import fill_ds_config, read_ds_config


@pytest.fixture
def one_rank(monkeypatch):
    """The environment a launcher gives rank 0 of 1; the signal handlers the trainer
    installs are put back afterwards (they would outlive the test in pytest's process)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def train_in_process(tmp_path, demo_data, name: str, *overrides: str) -> list[dict]:
    from pipeline.trainer import prepare, run
    cfg = load_config(None, [
        "model.name=msclip-s-tiny", f"data.train_shards={demo_data}/shards/photos", "data.workers=0",
        "data.shuffle_buffer=50", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
        "optim.warmup_steps=2", f"train.output_dir={tmp_path / 'runs'}", f"train.run_name={name}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false", *overrides])
    ds_path = REPO_ROOT / "ds_configs" / "cpu_fp32.json"
    ds = fill_ds_config(read_ds_config(ds_path), cfg.train, cfg.optim, 1)
    assert run(cfg, ds, *prepare(cfg, ds, str(ds_path))) == 0
    return [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_n_steps_then_resume_then_n_steps_equal_2n_steps_in_process(tmp_path, demo_data, one_rank):
    straight = train_in_process(tmp_path, demo_data, "straight", "train.steps=6")
    train_in_process(tmp_path, demo_data, "split", "train.steps=3")
    split = train_in_process(tmp_path, demo_data, "split", "train.steps=6", "train.resume=latest")

    def per_step(records, key):
        return {r["step"]: r[key] for r in records if key in r and "event" not in r}

    def digests(records):
        return {r["step"]: r["keys_sha1"] for r in records if r.get("event") == "batch"}

    assert sorted(per_step(straight, "loss")) == list(range(1, 7))
    assert per_step(split, "loss") == per_step(straight, "loss")  # exactly, in fp32
    assert digests(split) == digests(straight)  # the same samples in every step
    assert any(r.get("event") == "run_start" for r in split[1:])  # it did resume, in one MLflow run
