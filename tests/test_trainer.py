"""The training loop without a launcher (issue 16 item 3): the loop lives in
pipeline/train/trainer.py, so one plain Python process of world size 1 runs it through the
entry point's `main` (launch/train.py: preflight's plan, the evaluator, the trainer), and its resume
property is tested in seconds (with token dropping and its unmasked phase on); the launcher tests (tests/test_train_e2e.py) keep the wiring
of real processes. The runs go in a fresh interpreter rather than pytest's own: DeepSpeed
caches its world group in module state, and a group left by another test broke the
engine's first broadcast."""
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, free_port

TRAIN_THREE_TIMES = """
import sys
from launch.train import main

ds_path, zero3_path, common = sys.argv[1], sys.argv[2], sys.argv[3:]
# the first leg of a split run stops at step 3, before the unmasked phase of steps 5-6; the
# compiled run (model.compile) splits the same way on ZeRO-3 with activation checkpointing
compiled = ["model.compile=true", "model.grad_checkpointing=true"]
for ds, name, *extra in ([ds_path, "straight", "train.steps=6"],
                         [ds_path, "split", "train.steps=3", "train.unmasked_steps=0"],
                         [ds_path, "split", "train.steps=6", "train.resume=latest"],
                         [zero3_path, "compiled", "train.steps=3", "train.unmasked_steps=0", *compiled],
                         [zero3_path, "compiled", "train.steps=6", "train.resume=latest", *compiled]):
    assert main(["--deepspeed_config", ds, *common, f"train.run_name={name}", *extra]) == 0
"""


def test_n_steps_then_resume_then_n_steps_equal_2n_steps_without_a_launcher(tmp_path, demo_data):
    """Also model.compile in the real engine path (pipeline/model/compile.py through the
    trainer): under ZeRO-3 (its parameter-gathering hooks inside every compiled block), with
    activation checkpointing (a compiled block recomputed in backward), token dropping (the
    adapters' gathers) and its unmasked phase (the regions' second shapes), split by a
    resume: the losses of the eager straight run within fp32 reordering tolerance, the
    compilation reported on each start's first step."""
    # evaluation during training by a suite (eval.suite): one dataset there, one not
    suite = tmp_path / "mini.yaml"
    suite.write_text("name: mini\ndatasets:\n  - {name: digits, task: zeroshot_classification, paths: [digits]}\n"
                     "  - {name: imagenet1k, task: zeroshot_classification, paths: [wds_imagenet1k]}\n")
    common = [f"eval.suite={suite}", f"eval.root={demo_data / 'eval'}", "eval.every_steps=3", "eval.workers=0",
              "model.name=msclip-s-tiny", f"data.train_shards={demo_data}/shards/photos", "data.workers=0",
              "data.readers=1", "data.shuffle_buffer=50", "train.global_batch_size=8", "train.micro_batch_size=8",
              "train.log_every=1",
              "optim.warmup_steps=2", f"train.output_dir={tmp_path / 'runs'}",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
              "train.batch_digests=true",
              # token dropping on, its unmasked phase the last two steps: resume keeps the
              # kept tokens (drawn per sample) and the phase (a function of the step)
              "model.token_drop=0.5", "train.unmasked_steps=2"]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    zero3 = tmp_path / "zero3_fp32.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "steps_per_print": 1000000,
                                 "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    done = subprocess.run([sys.executable, "-c", TRAIN_THREE_TIMES,
                           str(REPO_ROOT / "ds_configs" / "cpu_fp32.json"), str(zero3), *common],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[eval] suite mini: imagenet1k skipped") == 5  # once per start

    def records(name):
        return [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]

    def losses(name):
        return {r["step"]: r["loss"] for r in records(name) if "loss" in r and "event" not in r}

    def digests(name):
        return {r["step"]: r["keys_sha1"] for r in records(name) if r.get("event") == "batch"}

    assert sorted(losses("straight")) == list(range(1, 7))
    # model TFLOP/s per device on every log step; no MFU on a CPU (no spec peak: pipeline/train/mfu.py)
    logged = [r for r in records("straight") if "loss" in r and "event" not in r]
    assert all(r["tflops_per_device"] > 0 and "mfu" not in r for r in logged)
    assert "[train] mfu: no spec peak for a cpu device (set tracking.peak_tflops)" in done.stdout
    assert losses("split") == losses("straight")  # exactly, in fp32
    assert digests("split") == digests("straight") and len(digests("straight")) == 6  # the same samples each step
    assert sum(r.get("event") == "run_start" for r in records("split")) == 2  # it did resume
    evals = {r["step"]: r for r in records("straight") if "eval/suite/mini/mean" in r}
    assert sorted(evals) == [3, 6] and all(r["eval/suite/mini/mean"] == r["eval/zeroshot/digits/acc1"]
                                           for r in evals.values())
    kept = {r["step"]: r["tokens_kept"] for r in records("straight") if "tokens_kept" in r}
    assert kept == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 1.0, 6: 1.0}  # msclip-s-tiny: 8 of 16 patch tokens

    compiled, straight = losses("compiled"), losses("straight")
    assert sorted(compiled) == list(range(1, 7))
    for step in straight:
        assert abs(compiled[step] - straight[step]) <= 1e-4 * abs(straight[step]), (step, compiled[step], straight[step])
    assert digests("compiled") == digests("straight")
    assert done.stdout.count("[train] model.compile: 22 regions") == 2  # pipeline.model.compile.regions, each start
    assert done.stdout.count(" (model.compile)\n") == 2  # "[train] first step: N s (model.compile)"
    assert [r["step"] for r in records("compiled") if "first_step_s" in r] == [1, 4]

