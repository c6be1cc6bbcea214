"""bench/gpu.sh on CPU, through its stand-in settings: a GPU machine is lent for minutes,
so a failing GPU test must not stop the bench, and both outputs must reach the results."""
import os
import subprocess

from conftest import REPO_ROOT


def test_a_failing_gpu_test_still_runs_the_bench_and_appends_both_outputs(tmp_path):
    standin = tmp_path / "test_standin.py"
    standin.write_text("def test_fails_on_purpose():\n    assert False, 'stand-in'\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier figures\n")
    env = {**os.environ, "GPU_SH_PYTHON": "python", "GPU_SH_DEVICE": "stand-in CPU",
           "GPU_SH_TESTS": str(standin), "GPU_SH_RESULTS": str(results),
           "GPU_SH_BENCH": "--device cpu --model clip-tiny --batch-size 4 --steps 1 --repeats 1 --precisions fp32",
           "GPU_SH_PROFILE": "--device cpu --models clip-tiny --precision fp32 --batch-size 2 --steps 1 --rows 3",
           "GPU_SH_DECODE": "--images 4 --repeats 1"}
    done = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr  # pytest's status, not the bench's
    text = results.read_text()
    assert text.startswith("# earlier figures\n")  # appended, never overwritten
    assert "on stand-in CPU" in text
    assert "1 failed" in text and "(exit 1)" in text  # the tests' summary
    assert "ratio ours/open_clip fp32" in text  # the bench ran after the failure
    assert "clip-tiny eager fp32" in text and "kernels per step" in text  # the profile
    assert "images/s per core" in text  # the decode rates
    assert "test_fails_on_purpose" in done.stdout  # pytest's output is shown, not kept in a temp file


def test_deepspeed_gets_an_arch_list_it_can_parse(monkeypatch):
    from pipeline.train.engine import arch_list_deepspeed_can_parse
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0a+PTX")
    arch_list_deepspeed_can_parse()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0 10.0+PTX"
