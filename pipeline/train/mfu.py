"""Model FLOPs utilization against the chip's spec peak: achieved model FLOP/s (the
model's forward and backward FLOPs per sample, pipeline/model/flops.py, times samples/s)
over the dense peak the vendor gives for the precision the step runs in. That is the
convention every anchor uses (PaLM, arXiv 2204.02311, appendix B; torchtitan's
`get_peak_flops`; NeMo's throughput tables), never a measured matmul rate, which flatters
whatever the chip does badly. `tracking.peak_tflops` overrides the table (a GPU not in
it, a clock-capped part).

Dense tensor-core peaks from the vendors' datasheets (TFLOP/s per GPU; the sparse
figures the datasheets print first are twice these and are not used): NVIDIA A100 (40
and 80 GB, SXM and PCIe), H100 SXM / PCIe / NVL, H200 / H200 NVL, B200, L40S; AMD
Instinct MI300X. fp32 training counts against the TF32 peak only where float32
matmuls may use TF32 (`torch.set_float32_matmul_precision("high")`); with PyTorch's
default ("highest") they run on the CUDA cores, which the table does not hold: no MFU
then unless tracking.peak_tflops says.
"""
from __future__ import annotations

# (fragments of the device name, all present; dense bf16, dense tf32), first match wins
SPEC_PEAK_TFLOPS = (
    (("H100", "NVL"), 835.0, 417.5),
    (("H100", "PCIE"), 756.0, 378.0),
    (("H100",), 989.4, 494.7),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200", "NVL"), 835.0, 417.5),
    (("H200",), 989.4, 494.7),
    (("A100",), 312.0, 156.0),
    (("B200",), 2250.0, 1125.0),
    (("L40S",), 362.1, 183.2),
    (("MI300X",), 1307.4, 653.7),
)


def spec_peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of `device_name` (as torch.cuda.get_device_name reports it) in
    "bf16" or "tf32", or None for a device the table does not know."""
    name = device_name.upper()
    for fragments, bf16, tf32 in SPEC_PEAK_TFLOPS:
        if all(f in name for f in fragments):
            return {"bf16": bf16, "tf32": tf32}.get(precision)
    return None


def step_precision(bf16: bool) -> str | None:
    """What a step's matmuls run in: bf16, TF32 where float32 matmuls may use it, else
    full fp32 (CUDA cores: not in the table)."""
    import torch
    if bf16:
        return "bf16"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else None


def peak_tflops(override: float | None, device, bf16: bool) -> tuple[float | None, str]:
    """(peak TFLOP/s per device for MFU, where it comes from): tracking.peak_tflops, else
    the spec peak of this CUDA device in the step's precision, else (None, why not)."""
    if override:
        return override, "tracking.peak_tflops"
    import torch
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None, f"no spec peak for a {getattr(device, 'type', device)} device (set tracking.peak_tflops)"
    name, precision = torch.cuda.get_device_name(device), step_precision(bf16)
    peak = spec_peak_tflops(name, precision) if precision else None
    if peak is None:
        why = (f"{name} is not in the spec table" if precision else
               "float32 matmuls run in full fp32 (TF32 off)")
        return None, f"{why}: no MFU unless tracking.peak_tflops is set"
    return peak, f"{name} dense {precision} spec peak"
