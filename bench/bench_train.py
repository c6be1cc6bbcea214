"""Train-step throughput, FLOPs and MFU: our model against open_clip's CLIP of the same
architecture, same batch, image size, threads and precision, on synthetic tensors (compute
alone) and, with --shards, fed by each side's own loader from webdataset shards (ours: a
DataStream with uint8 batches normalized by the consumer; open_clip: open_clip_train's
get_wds_dataset; loading in the stepping process unless --loader-workers), in one process, alternating, best of --repeats.

    python -m bench.bench_train [--model clip-b32] [--batch-size 8] [--steps 2] [--repeats 2]
        [--precisions fp32,bf16] [--threads N] [--variants msclip-b32,msclip-s-b32] [--memory]
        [--shards data/demo/shards/digits] [--loader-workers 0] [--device cuda] [--token-drop 0.5]

A step is forward, the CLIP loss, backward and an AdamW step. Precisions: fp32 against
fp32; bf16 = torch.autocast(bfloat16) on both (open_clip's `--precision amp_bf16`);
bf16_engine = our trainer's bf16 step, DeepSpeed's bf16 engine under ZeRO (bf16 weights,
no autocast, a fused AdamW on one flat fp32 master: `engine_bf16_step`), on both, so
"ours bf16_engine / open_clip bf16" is our trainer's step against open_clip's amp_bf16
step (open_clip_train: autocast and torch's AdamW, tensor by tensor on CPU). The
reference is `open_clip.CLIP` built with our architecture's numbers (for clip-b32 that is
ViT-B-32-quickgelu: the same 151,277,313 parameters). `--variants` times our other models
against our baseline (e.g. msclip-s-b32 vs clip-b32). FLOPs per sample are counted with
torch's FlopCounterMode over forward + backward; TFLOP/s is achieved model FLOPs per
second, MFU divides it by the chip's dense spec peak (a known GPU: pipeline/train/mfu.py;
none on a CPU), and `measured` by this machine's own large-matmul rate in fp32 and bf16,
printed beside it. `--memory` also
reports each model's peak RSS, from a fresh child process per model and precision (a
process's peak is monotonic, so it cannot be compared inside one process).
With --device cuda the models, batches and autocast run on the GPU (bench/gpu.sh), the
clock waits for the device.
`--token-drop P` adds token dropping (FLIP): ours at model.token_drop P (the kept
positions drawn as the loader draws them) against our unmasked step and against
open_clip's `patch_dropout=P`, and every --variants model with and without; FLOPs are
counted on the dropped models. `--profile` prints torch.profiler's top operators of two of our steps per precision.
`--compile` adds our model and every --variants model under model.compile (torch.compile
of each transformer block, conv stem, branch stage and adapter: pipeline/model/compile.py),
and open_clip's model under torch.compile as open_clip_train's `--torchcompile` does it
(the whole model); each compiled step's first call, the compilation, is timed on its own
("compile s") and left out of the timed steps.
Prints a table and one JSON line.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cli import command_line
from pipeline.losses import contrastive_loss
from pipeline.model import build_model
from pipeline.model.token_drop import draw_keep
from pipeline.train.mfu import spec_peak_tflops, step_precision


def open_clip_twin(arch, patch_dropout: float = 0.0):
    """open_clip's CLIP with our architecture's numbers (QuickGELU, LN eps as ours), with
    its token dropping (`patch_dropout`, FLIP's masking) at `patch_dropout`."""
    import open_clip
    vision = open_clip.model.CLIPVisionCfg(layers=arch.vision_layers, width=arch.vision_width,
                                          head_width=arch.vision_width // arch.vision_heads, patch_size=arch.patch_size,
                                          image_size=arch.image_size, patch_dropout=patch_dropout)
    text = open_clip.model.CLIPTextCfg(context_length=arch.context_length, vocab_size=arch.vocab_size,
                                      width=arch.text_width, heads=arch.text_heads, layers=arch.text_layers)
    return open_clip.CLIP(embed_dim=arch.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def features(model, images, text, keep=None):
    if hasattr(model, "arch"):  # ours, with token dropping's kept positions if given
        out = model(images, text, keep=keep)
        return out["image_features"], out["text_features"], out["logit_scale"]
    image_features, text_features, scale = model(images, text)
    return image_features, text_features, scale


def make_batch(arch, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, arch.image_size, arch.image_size, generator=g)
    text = torch.randint(1, 49405, (batch_size, arch.context_length), generator=g)
    text[:, 0], text[:, -1] = 49406, 49407
    return images, text


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def shard_batches(side: str, arch, args):
    """Endless (images, text) from --shards through `side`'s own loader."""
    from bench.bench_loader import open_clip_loader, our_stream
    from pipeline.pixels import pixels_on_device
    if side == "open_clip":  # resampled: an epoch of 10^7 samples outlasts any run here
        for images, text in open_clip_loader(args.shards, args.batch_size, args.loader_workers, arch.image_size,
                                             arch.context_length):
            yield images.to(args.device, non_blocking=True), text.to(args.device, non_blocking=True)
        return
    for batch in our_stream(args.shards, args.batch_size, args.loader_workers, arch.image_size,
                            context_length=arch.context_length):
        batch = pixels_on_device(batch, torch.device(args.device))  # what train_step does with uint8 batches
        yield batch["images"], batch["text"].to(args.device, non_blocking=True)


def drop_keep(arch, batch_size: int, drop: float, seed: int = 0) -> torch.Tensor:
    """Kept patch positions per sample at drop rate `drop`, as our loader draws them."""
    return torch.stack([draw_keep(arch.grid_size ** 2, drop, torch.Generator().manual_seed(seed * 100003 + i))
                        for i in range(batch_size)])


def make_step(model, images, text, precision: str, batches=None, keep=None, compile: str = ""):
    """One training step's closure; with `batches` (an iterator) each step takes its next
    batch; `keep`: our model's kept tokens (token dropping). `compile`: "regions" (ours,
    model.compile) or "model" (open_clip's --torchcompile), on a copy of `model`."""
    if precision == "bf16_engine":
        return engine_bf16_step(model, images, text, keep, batches, compile)
    if compile:
        model = compiled_copy(model, compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    device_type = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step():
        nonlocal images, text
        if batches is not None:
            images, text = next(batches)
        with autocast():
            image_features, text_features, scale = features(model, images, text, keep)
        loss = contrastive_loss(image_features.float(), text_features.float(), scale.float().reshape(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def compiled_copy(model, how: str):
    """A copy compiled after copying: a deep copy of a compiled module would still call the
    original's compiled forward."""
    import copy

    from pipeline.model.compile import compile_regions
    model = copy.deepcopy(model)
    if how == "regions":
        compile_regions(model)
        return model
    return torch.compile(model)


def engine_bf16_step(model, images, text, keep=None, batches=None, compile: str = ""):
    """The step as our trainer takes it in bf16, DeepSpeed's bf16 engine under ZeRO
    (ds_configs/cpu_bf16.json, zero2_bf16.json): bf16 weights and activations, no autocast;
    the gradients gathered into one flat fp32 buffer; one fused AdamW step on the flat fp32
    master weights (ZeRO's partition, DeepSpeed's FusedAdam); the master copied back into
    the bf16 weights. On a bf16 copy of `model` (its fp32 weights untouched)."""
    import copy
    low = copy.deepcopy(model).to(torch.bfloat16)
    if compile:
        low = compiled_copy(low, compile)
    params = [p for p in low.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().float().reshape(-1) for p in params]).requires_grad_(True)
    masters = [v.view(p.shape) for v, p in zip(torch.split(flat.detach(), [p.numel() for p in params]), params)]
    optimizer = torch.optim.AdamW([flat], lr=1e-5, fused=True)

    def step():
        nonlocal images, text
        if batches is not None:
            images, text = next(batches)
        image_features, text_features, scale = features(low, images.to(torch.bfloat16), text, keep)
        loss = contrastive_loss(image_features.float(), text_features.float(), scale.float().reshape(1))
        loss.backward()
        flat.grad = torch.cat([p.grad.reshape(-1) for p in params]).float()
        for p in params:
            p.grad = None
        optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
    return step


def print_profile(step, title: str, rows: int = 12):
    """Where a step's time goes: torch.profiler over two steps, top operators by self time
    (bench/RESULTS.md quotes these tables)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        step()
    print(f"profile: {title}, two steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def count_flops(model, images, text, keep=None) -> float:
    """Forward + backward FLOPs per sample, counted (with the kept tokens at token dropping;
    open_clip's patch_dropout draws its own in training mode)."""
    counter = FlopCounterMode(display=False)
    with counter:
        image_features, text_features, _ = features(model, images[:2], text[:2], None if keep is None else keep[:2])
        (image_features.sum() + text_features.sum()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    n = 8192 if device.startswith("cuda") else n  # a GPU needs a bigger matmul to reach its peak
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def spec_peak(device: str, precision: str) -> float | None:
    """The chip's dense spec peak in FLOP/s for a precision of this bench, or None off a
    known GPU; fp32 steps count against TF32 only where float32 matmuls may use it (as the
    trainer counts them: pipeline/train/mfu.py step_precision)."""
    if not device.startswith("cuda"):
        return None
    kind = step_precision(bf16=precision != "fp32")
    peak = spec_peak_tflops(device_name(device), kind) if kind else None
    return peak * 1e12 if peak else None


def timed(steps: dict, n: int, repeats: int, device: str = "cpu") -> dict:
    for step in steps.values():  # warm-up (allocator, autocast caches)
        step()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # alternate: the machine's noise hits both
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best


def child_peak_rss(model: str, precision: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds one model and takes the steps."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec (the child would
    # report this process's peak); VmHWM belongs to the new address space.
    code = ("from bench.bench_train import one_model_steps; "
            f"one_model_steps({model!r}, {precision!r}, {args.batch_size}, {args.steps}, {args.threads}); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_model_steps(model_name: str, precision: str, batch_size: int, steps: int, threads: int):
    torch.set_num_threads(threads)
    ours = model_name.startswith("ours:")
    arch = build_model(model_name.split(":", 1)[1]).arch
    torch.manual_seed(0)
    model = build_model(arch) if ours else open_clip_twin(arch)
    images, text = make_batch(arch, batch_size)
    step = make_step(model, images, text, precision)
    for _ in range(steps + 1):
        step()


def main(argv=None):
    parser = command_line("python -m bench.bench_train", __doc__, notes=False)
    parser.add_argument("--model", default="clip-b32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    # All cores by default: torch.get_num_threads() would inherit a 1 set by an earlier
    # bench in the same process (python -m bench runs the tokenizer single-threaded).
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", default="", help="our other models to time against --model, comma-separated")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--shards", help="also time steps fed from these shards by each side's loader")
    # 0: each side loads in the stepping process, so a step from shards costs load + compute.
    # A worker would fork a process that holds every model and optimizer here (B/32: ~14
    # GB; the first such run was OOM-killed on this 24 GB machine).
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators of two of our steps per precision")
    parser.add_argument("--compile", action="store_true",
                        help="also time our model under torch.compile (model.compile), the first step compiling")
    parser.add_argument("--token-drop", type=float, default=0.0,
                        help="also time token dropping at this rate: ours (model.token_drop) against open_clip's "
                             "patch_dropout, and each --variants model with and without")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = build_model(args.model).arch
    images, text = (t.to(args.device) for t in make_batch(arch, args.batch_size))
    torch.manual_seed(0)
    ours, ref = build_model(arch).to(args.device), open_clip_twin(arch).to(args.device)
    counts = {"ours": sum(p.numel() for p in ours.parameters()), "open_clip": sum(p.numel() for p in ref.parameters())}
    flops = {"ours": count_flops(ours, images, text), "open_clip": count_flops(ref, images, text)}
    variants = [v for v in args.variants.split(",") if v]
    variant_models = {v: build_model(v).to(args.device) for v in variants}
    for v, model in variant_models.items():
        flops[v] = count_flops(model, *(t.to(args.device) for t in make_batch(model.arch, 2)))
    # "<name>+compile" -> (its eager model, how it compiles); the copies compile in the warm-up
    compiled = {}
    if args.compile:
        compiled = {"ours+compile": (ours, "regions"), "open_clip+compile": (ref, "model"),
                    **{f"{v}+compile": (model, "regions") for v, model in variant_models.items()}}
        flops.update({name: flops[name.removesuffix("+compile")] for name in compiled})
    compile_seconds = {}
    keeps = {}  # "<name>+drop" -> (its model, the kept positions); ours and the variants share their models
    if args.token_drop:
        drop_ref = open_clip_twin(arch, patch_dropout=args.token_drop).to(args.device)
        for name, model in {"ours": ours, **variant_models}.items():
            keeps[f"{name}+drop"] = (model, drop_keep(model.arch, args.batch_size, args.token_drop).to(args.device))
            flops[f"{name}+drop"] = count_flops(model, *(t.to(args.device) for t in make_batch(model.arch, 2)),
                                                keeps[f"{name}+drop"][1])
        flops["open_clip+drop"] = count_flops(drop_ref.train(), images, text)
    # only the precisions asked for: a bf16 matmul on a CPU without AVX-512 BF16 runs ~100x
    # slower than fp32 (2.3 s for 1024^3 on an AVX2-only machine), and the peak's 2048^3 x 6
    # took minutes there
    wanted = {"bf16" if p == "bf16_engine" else p for p in args.precisions.split(",")}
    peaks = {p: peak_flops(dtype, device=args.device) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             if p in wanted}
    if "bf16" in peaks:
        peaks["bf16_engine"] = peaks["bf16"]
    # MFU is against the chip's dense spec peak (pipeline/train/mfu.py), as every anchor counts
    # it; the measured matmul rate beside it says how much of the gap is the chip's own
    spec = {p: spec_peak(args.device, p) for p in peaks}
    results = {}
    for precision in args.precisions.split(","):
        steps = {"ours": make_step(ours, images, text, precision), "open_clip": make_step(ref, images, text, precision)}
        for v, model in variant_models.items():
            steps[v] = make_step(model, *(t.to(args.device) for t in make_batch(model.arch, args.batch_size)), precision)
        for name, (model, how) in compiled.items():
            steps[name] = make_step(model, *(t.to(args.device) for t in make_batch(model.arch, args.batch_size))
                                    if name != "open_clip+compile" else (images, text), precision, compile=how)
            started = time.perf_counter()
            steps[name]()  # the compilation, timed on its own; timed() warms up again
            synchronize(args.device)
            compile_seconds[f"{name}/{precision}"] = round(time.perf_counter() - started, 1)
        for name, (model, keep) in keeps.items():
            steps[name] = make_step(model, *(t.to(args.device) for t in make_batch(model.arch, args.batch_size)),
                                    precision, keep=keep)
        if keeps:
            steps["open_clip+drop"] = make_step(drop_ref, images, text, precision)
        if args.shards:
            for side, model in (("ours", ours), ("open_clip", ref)):
                steps[f"{side}+shards"] = make_step(model, None, None, precision, shard_batches(side, arch, args))
        seconds = timed(steps, args.steps, args.repeats, args.device)
        if args.profile:
            print_profile(steps["ours"], f"ours {args.model} {precision}")
        for name, s in seconds.items():
            rate = args.batch_size / s
            flop = flops[name.removesuffix("+shards")]
            results[f"{name}/{precision}"] = {
                "samples_per_s": round(rate, 3), "tflops": round(rate * flop / 1e12, 3),
                "mfu": round(rate * flop / spec[precision], 4) if spec[precision] else None,
                "of_measured_peak": round(rate * flop / peaks[precision], 4)}
    if args.memory:
        for precision in args.precisions.split(","):
            for side in ("ours", "open_clip"):
                name = f"ours:{args.model}" if side == "ours" else f"ref:{args.model}"
                results[f"{side}/{precision}"]["peak_rss_mib"] = round(child_peak_rss(name, precision, args), 1)

    spec_line = "; spec peak " + ", ".join(f"{p} {v / 1e12:.0f} TFLOP/s" for p, v in spec.items() if v) \
        if any(spec.values()) else "; no spec peak here (no MFU; `measured`: of the measured matmul rate)"
    print(f"{args.model} ({counts['ours']:,} params; open_clip twin {counts['open_clip']:,}), batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats} x {args.steps} steps; {device_name(args.device)} measured "
          f"matmul {', '.join(f'{p} {peaks[p] / 1e12:.2f} TFLOP/s' for p in ('fp32', 'bf16') if p in peaks)}"
          f"{spec_line}")
    print(f"{'model/precision':<28} {'samples/s':>10} {'GFLOP/sample':>13} {'TFLOP/s':>8} {'MFU':>6} {'measured':>9} "
          f"{'peak MiB':>9}")
    for key, r in results.items():
        name = key.split("/")[0].removesuffix("+shards")
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6}"
        print(f"{key:<28} {r['samples_per_s']:10.2f} {flops[name] / 1e9:13.1f} {r['tflops']:8.2f} {mfu} "
              f"{r['of_measured_peak']:9.1%} {r.get('peak_rss_mib', float('nan')):9.0f}")
    ratios = {}
    for precision in args.precisions.split(","):
        ratios[f"ours/open_clip {precision}"] = results[f"ours/{precision}"]["samples_per_s"] / results[f"open_clip/{precision}"]["samples_per_s"]
        if args.shards:
            ratios[f"ours/open_clip {precision}, from shards"] = (results[f"ours+shards/{precision}"]["samples_per_s"] /
                                                                 results[f"open_clip+shards/{precision}"]["samples_per_s"])
        for v in variants:
            ratios[f"{v}/ours {precision}"] = results[f"{v}/{precision}"]["samples_per_s"] / results[f"ours/{precision}"]["samples_per_s"]
        def rate(name):
            return results[f"{name}/{precision}"]["samples_per_s"]
        if compiled:
            ratios[f"ours compiled/open_clip compiled {precision}"] = rate("ours+compile") / rate("open_clip+compile")
            for name in ("ours", "open_clip", *variants):
                ratios[f"{name} compiled/eager {precision}"] = rate(f"{name}+compile") / rate(name)
            for v in variants:
                ratios[f"{v}/ours {precision}, compiled"] = rate(f"{v}+compile") / rate("ours+compile")
        if keeps:
            for name in ("ours", *variants):
                ratios[f"{name} drop {args.token_drop}/{name} {precision}"] = rate(f"{name}+drop") / rate(name)
            ratios[f"ours drop/open_clip patch_dropout {args.token_drop} {precision}"] = rate("ours+drop") / rate("open_clip+drop")
    precisions = args.precisions.split(",")
    if "bf16" in precisions and "fp32" in precisions:
        ratios["ours bf16/open_clip fp32"] = results["ours/bf16"]["samples_per_s"] / results["open_clip/fp32"]["samples_per_s"]
    if compiled and {"bf16", "bf16_engine"} <= set(precisions):  # each side at its best configuration
        ratios["ours bf16_engine compiled/open_clip amp_bf16 compiled"] = (
            results["ours+compile/bf16_engine"]["samples_per_s"] / results["open_clip+compile/bf16"]["samples_per_s"])
    if "bf16_engine" in precisions:  # our trainer's bf16 against open_clip's amp_bf16 (autocast) and fp32
        for other in ("bf16", "fp32"):
            if other in precisions:
                ratios[f"ours bf16_engine/open_clip {other}"] = (results["ours/bf16_engine"]["samples_per_s"] /
                                                                results[f"open_clip/{other}"]["samples_per_s"])
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.2f}x")
    for key, seconds in compile_seconds.items():
        print(f"compile {key}: {seconds} s (the first step)")
    print(json.dumps({"model": args.model, "device": args.device, "batch_size": args.batch_size, "threads": args.threads,
                      "params": counts,
                      "flops_per_sample": flops, "peak_flops": peaks, "results": results,
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}, "compile_s": compile_seconds}))
    return results, ratios


if __name__ == "__main__":
    main()
