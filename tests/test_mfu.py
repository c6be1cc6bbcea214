"""MFU against the chip's spec peak (issue 43 item 1): the dense peaks of the vendors'
datasheets chosen from the name torch reports, tracking.peak_tflops over them, and no MFU
where the chip is not known."""
import pytest
import torch

from pipeline.train.mfu import peak_tflops, spec_peak_tflops


@pytest.mark.parametrize("name,precision,peak", [
    # the names torch.cuda.get_device_name reports; dense peaks from NVIDIA's and AMD's datasheets
    ("NVIDIA A100-SXM4-40GB", "bf16", 312.0), ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 NVL", "tf32", 417.5),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200 NVL", "bf16", 835.0), ("NVIDIA B200", "bf16", 2250.0),
    ("NVIDIA L40S", "tf32", 183.2), ("AMD Instinct MI300X", "bf16", 1307.4),
])
def test_a_known_gpu_gives_its_dense_spec_peak(name, precision, peak):
    assert spec_peak_tflops(name, precision) == peak
    # the tensor cores of every one of them do bf16 at about twice their TF32 rate
    assert spec_peak_tflops(name, "bf16") == pytest.approx(2 * spec_peak_tflops(name, "tf32"), rel=0.02)


def test_an_unknown_device_gives_no_peak_and_no_mfu(monkeypatch):
    assert spec_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    peak, why = peak_tflops(None, torch.device("cpu"), bf16=True)
    assert peak is None and "tracking.peak_tflops" in why
    assert peak_tflops(312.0, torch.device("cpu"), bf16=True) == (312.0, "tracking.peak_tflops")  # the override wins
    # a CUDA device the table does not know, and fp32 steps on a known one with TF32 off
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert peak_tflops(None, torch.device("cuda", 0), bf16=True)[0] is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(None, torch.device("cuda", 0), bf16=True) == (989.4, "NVIDIA H100 80GB HBM3 dense bf16 spec peak")
    assert torch.get_float32_matmul_precision() == "highest"
    assert peak_tflops(None, torch.device("cuda", 0), bf16=False)[0] is None
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_tflops(None, torch.device("cuda", 0), bf16=False)[0] == 494.7
