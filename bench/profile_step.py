"""Where a train step's time goes: each model's step, eager and with model.compile's regions
(pipeline/model/compile.py), profiled by torch.profiler, operators ranked by their share
of the step's self time, and the number of kernels one step runs.

    python -m bench.profile_step [--models clip-b32,msclip-s-b32] [--precision bf16]
        [--batch-size 8] [--steps 2] [--rows 12] [--compile] [--device cpu] [--threads N]
        [--by-shape aten::convolution_backward]

A step is forward, the CLIP loss and backward on synthetic tensors (the optimizer step is
the engine's: bench_train --profile). bf16 is the bf16 engine's forward: bf16 weights and
activations, no autocast. "Kernels per step" counts, on the CPU, the top-level aten
operators (those not called by another) plus the C++ kernels inductor generated (each
compiled region's fused loops), on CUDA the kernels the GPU ran. Inductor's generated
kernels appear as one row, "inductor fused kernels". The compilation happens in two
untimed warm-up steps; its time (the first step) is printed.
Prints a table per model and mode, and one JSON line.
"""
from __future__ import annotations

import collections
import copy
import json
import re
import time

import torch

from pipeline.cli import command_line
from pipeline.losses import contrastive_loss
from pipeline.model import build_model
from pipeline.model.compile import compile_regions

GENERATED = re.compile(r"cpp_fused|triton_")  # inductor's kernels: cpp_fused_* on CPU, triton_* on CUDA


def synthetic_batch(arch, batch_size: int, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, arch.image_size, arch.image_size, generator=generator)
    text = torch.randint(1, 49405, (batch_size, arch.context_length), generator=generator)
    text[:, -1] = 49407
    return images.to(device, dtype), text.to(device)


def make_step(model, images, text):
    def step():
        out = model(images, text)
        loss = contrastive_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def is_kernel(name: str) -> bool:
    return name.startswith("aten::") or bool(GENERATED.search(name))


def profile_steps(step, steps: int, device: str, by_shape: str = "") -> tuple[dict, float]:
    """({operator: self microseconds per step}, kernels per step); with `by_shape`, that
    operator's calls grouped by input shapes are printed (which layer it is)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=bool(by_shape)) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    if by_shape:
        rows = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == by_shape),
                      key=lambda e: -e.self_cpu_time_total)
        for e in rows[:8]:
            shapes = [shape for shape in e.input_shapes if shape]
            print(f"  {by_shape} {e.self_cpu_time_total / steps / 1e3:8.1f} ms/step  inputs {shapes}")
    times, kernels = collections.Counter(), 0
    for event in prof.events():
        if device == "cuda":
            if event.device_type == torch.autograd.DeviceType.CUDA:
                times["inductor fused kernels" if GENERATED.search(event.name) else event.name] += event.self_device_time_total
                kernels += 1
            continue
        if not is_kernel(event.name):
            continue
        name = "inductor fused kernels" if GENERATED.search(event.name) else event.name
        times[name] += event.self_cpu_time_total
        parent = event.cpu_parent
        while parent is not None and not is_kernel(parent.name):
            parent = parent.cpu_parent
        kernels += parent is None
    return {k: v / steps for k, v in times.items()}, kernels / steps


def main(argv=None) -> dict:
    parser = command_line("python -m bench.profile_step", __doc__, notes=False)
    parser.add_argument("--models", default="clip-b32,msclip-s-b32")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="also profile model.compile's regions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--by-shape", default="", metavar="OP",
                        help="also list this operator's calls by input shape (e.g. aten::convolution_backward)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        from torch._inductor import config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel is a profiler event
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    report = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        eager = build_model(name).to(args.device, dtype)
        images, text = synthetic_batch(eager.arch, args.batch_size, args.device, dtype)
        modes = {"eager": eager}
        if args.compile:
            modes["compiled"] = copy.deepcopy(eager)
            compile_regions(modes["compiled"])
        for mode, model in modes.items():
            step = make_step(model, images, text)
            started = time.perf_counter()
            step()
            synchronize(args.device)
            first = time.perf_counter() - started
            step()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(args.device)
            seconds = (time.perf_counter() - started) / args.steps
            times, kernels = profile_steps(step, args.steps, args.device, args.by_shape)
            total = sum(times.values())
            top = sorted(times.items(), key=lambda kv: -kv[1])[:args.rows]
            report[f"{name}/{mode}"] = {"step_s": round(seconds, 4), "first_step_s": round(first, 2),
                                        "kernels_per_step": kernels,
                                        "top": [[op, round(us / 1e3, 2), round(us / total, 4)] for op, us in top]}
            print(f"\n{name} {mode} {args.precision}, batch {args.batch_size}, {args.device}: step {seconds * 1e3:.0f} ms "
                  f"(first step {first:.1f} s), {kernels:.0f} kernels per step")
            print(f"  {'operator':<52} {'ms/step':>9} {'share':>7}")
            for op, us in top:
                print(f"  {op[:52]:<52} {us / 1e3:9.1f} {us / total:7.1%}")
    names = args.models.split(",")
    if len(names) == 2:
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            a, b = report[f"{names[1]}/{mode}"], report[f"{names[0]}/{mode}"]
            print(f"ratio {names[1]}/{names[0]} step time, {mode}: {a['step_s'] / b['step_s']:.2f}x; "
                  f"kernels {a['kernels_per_step']:.0f} vs {b['kernels_per_step']:.0f}")
    if args.compile:
        for name in names:
            e, c = report[f"{name}/eager"], report[f"{name}/compiled"]
            print(f"ratio {name} compiled/eager speed: {e['step_s'] / c['step_s']:.2f}x; kernels per step "
                  f"{c['kernels_per_step']:.0f} vs {e['kernels_per_step']:.0f}; compile (first step) {c['first_step_s']:.0f} s")
    print(json.dumps({"precision": args.precision, "batch_size": args.batch_size, "device": args.device,
                      "threads": args.threads, "report": report}))
    return report


if __name__ == "__main__":
    main()
