"""What each fast path buys, on against off, in one process, alternating, best of
--repeats (bench_train covers bf16 autocast against fp32).

    python -m bench.bench_fast_paths [--repeats 3] [--quick] [--only patch_depthwise,sdpa]

The fast paths:

* jpeg_draft (data.jpeg_draft): decode + eval transform of a 1280x854 JPEG to 224 px,
  with PIL's reduced-scale DCT decoding against a full decode;
* channels_last (model.channels_last): msclip-s-b32 forward + backward with NHWC images
  (its conv stem, parallel branch and adapters) against NCHW;
* compile (model.compile): msclip-s-b32 forward + backward (batch 8; the contrastive
  loss) with its regions compiled (pipeline/model/compile.py, inductor) against eager; the
  first compiled step's time is reported as the compile time;
* patch_depthwise: msclip-s-b32's bf16 forward + backward (batch 8; the contrastive loss)
  with the adapters' kernel == stride depthwise convolutions as patch sums
  (vision.PatchDepthwiseConv2d) against the same model running them as convolutions;
* sdpa: our attention (F.scaled_dot_product_attention) against the explicit
  softmax(QK^T / sqrt(d)) V it replaces, ViT-B/32 vision shapes, forward + backward;
* fused_qkv: one (D -> 3D) projection against three (D -> D) ones;
* fused_adamw: one AdamW step over clip-b32's 151M parameters, tensor by tensor (how a
  DDP trainer such as open_clip steps): torch's default implementation against torch's
  fused kernel and DeepSpeed's FusedAdam (the CPU op ds_configs/cpu_bf16.json selects).
  Under ZeRO each rank steps one flat partition instead, where the loop overhead this
  measures is gone (docs/performance.md).
Prints a table (ms on, ms off, speed-up) and one JSON line.
"""
from __future__ import annotations

import io
import json
import time

import torch

from pipeline.cli import command_line


def best_ms(fns: dict, repeats: int, inner: int = 1) -> dict:
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / inner * 1000)
    return best


def jpeg_draft(repeats: int) -> dict:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from pipeline.data.decode import decode_sample
    from pipeline.data.transforms import eval_transform
    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).resize((1280, 854)).save(buf, format="JPEG", quality=95)
    sample, transform = {"jpg": buf.getvalue(), "txt": b"a temple"}, eval_transform(224, "clip")
    return best_ms({"on": lambda: transform(decode_sample(sample, 224)[0]),
                    "off": lambda: transform(decode_sample(sample, 0)[0])}, repeats, inner=20)


def channels_last(repeats: int, quick: bool) -> dict:
    from pipeline.model import build_model
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny" if quick else "msclip-s-b32")
    size = model.arch.image_size
    images = torch.randn(4, 3, size, size)
    text = torch.randint(1, 49405, (4, model.arch.context_length))
    text[:, -1] = 49407

    def step(fmt):
        out = model(images.contiguous(memory_format=fmt), text)
        out["image_features"].sum().backward()
    return best_ms({"on": lambda: step(torch.channels_last), "off": lambda: step(torch.contiguous_format)}, repeats)


def compiled(repeats: int, quick: bool) -> dict:
    import copy

    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model
    from pipeline.model.compile import compile_regions
    torch.manual_seed(0)
    eager = build_model("msclip-s-tiny" if quick else "msclip-s-b32")
    model = copy.deepcopy(eager)
    compile_regions(model)
    size, batch = eager.arch.image_size, 8
    images = torch.randn(batch, 3, size, size)
    text = torch.randint(1, 49405, (batch, eager.arch.context_length))
    text[:, -1] = 49407

    def step(m):
        out = m(images, text)
        contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    start = time.perf_counter()
    step(model)
    compile_s = time.perf_counter() - start
    return {**best_ms({"on": lambda: step(model), "off": lambda: step(eager)}, repeats), "compile_s": compile_s}


def patch_depthwise(repeats: int, quick: bool) -> dict:
    import copy

    from torch import nn

    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model
    from pipeline.model.vision import PatchDepthwiseConv2d
    torch.manual_seed(0)
    patchwise = build_model("msclip-s-tiny" if quick else "msclip-s-b32").bfloat16()
    convolution = copy.deepcopy(patchwise)
    for module in convolution.modules():
        if isinstance(module, PatchDepthwiseConv2d):
            module.__class__ = nn.Conv2d  # the same weights, through the convolution kernel
    size = patchwise.arch.image_size
    images = torch.randn(8, 3, size, size).bfloat16()
    text = torch.randint(1, 49405, (8, patchwise.arch.context_length))
    text[:, -1] = 49407

    def step(model):
        out = model(images, text)
        contrastive_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()).backward()
        model.zero_grad(set_to_none=True)
    return best_ms({"on": lambda: step(patchwise), "off": lambda: step(convolution)}, repeats)


def attention(repeats: int) -> dict:
    from pipeline.model.layers import Attention
    torch.manual_seed(0)
    attn = Attention(768, 12)
    x = torch.randn(32, 50, 768, requires_grad=True)

    def explicit():
        B, N, D = x.shape
        q, k, v = attn.qkv(x).view(B, N, 3, 12, D // 12).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / (D // 12) ** 0.5).softmax(-1)
        attn.out_proj((weights @ v).transpose(1, 2).reshape(B, N, D)).sum().backward()
    return best_ms({"on": lambda: attn(x, False).sum().backward(), "off": explicit}, repeats, inner=3)


def fused_qkv(repeats: int) -> dict:
    torch.manual_seed(0)
    fused, separate = torch.nn.Linear(768, 3 * 768), [torch.nn.Linear(768, 768) for _ in range(3)]
    x = torch.randn(32 * 50, 768)
    return best_ms({"on": lambda: fused(x).sum().backward(),
                    "off": lambda: sum(layer(x).sum() for layer in separate).backward()}, repeats, inner=5)


def fused_adamw(repeats: int, quick: bool) -> dict:
    from pipeline.model import build_model
    model = build_model("clip-tiny" if quick else "clip-b32")
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"off": torch.optim.AdamW(params, lr=1e-5),  # the default: a per-tensor loop on CPU
                  "on": torch.optim.AdamW(params, lr=1e-5, fused=True)}
    try:
        from deepspeed.ops.adam import FusedAdam
        optimizers["deepspeed_fused"] = FusedAdam(params, lr=1e-5, adam_w_mode=True)
    except Exception as e:  # the op may not build on this machine
        print(f"DeepSpeed FusedAdam unavailable: {type(e).__name__}: {e}")
    return best_ms({k: opt.step for k, opt in optimizers.items()}, repeats)


def main(argv=None) -> dict:
    parser = command_line("python -m bench.bench_fast_paths", __doc__, notes=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated fast paths to run (default: all)")
    args = parser.parse_args(argv)
    paths = {"jpeg_draft": lambda: jpeg_draft(args.repeats), "channels_last": lambda: channels_last(args.repeats, args.quick),
             "compile": lambda: compiled(args.repeats, args.quick),
             "patch_depthwise": lambda: patch_depthwise(args.repeats, args.quick), "sdpa": lambda: attention(args.repeats),
             "fused_qkv": lambda: fused_qkv(args.repeats), "fused_adamw": lambda: fused_adamw(args.repeats, args.quick)}
    chosen = [name for name in args.only.split(",") if name] or list(paths)
    unknown = set(chosen) - set(paths)
    if unknown:
        parser.error(f"--only: no fast path {', '.join(sorted(unknown))} (known: {', '.join(paths)})")
    results = {name: paths[name]() for name in chosen}
    print(f"{'fast path':<16} {'ms on':>9} {'ms off':>9} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['on']:9.2f} {r['off']:9.2f} {r['off'] / r['on']:8.2f}x")
        if "compile_s" in r:
            print(f"{'  compile time':<16} {r['compile_s']:8.1f}s (the first compiled step)")
        if "deepspeed_fused" in r:
            print(f"{'  deepspeed':<16} {r['deepspeed_fused']:9.2f} {r['off']:9.2f} {r['off'] / r['deepspeed_fused']:8.2f}x")
    speedups = {name: round(r["off"] / r["on"], 3) for name, r in results.items()}
    if "deepspeed_fused" in results.get("fused_adamw", {}):
        speedups["fused_adamw_deepspeed"] = round(results["fused_adamw"]["off"] / results["fused_adamw"]["deepspeed_fused"], 3)
    print(json.dumps({"ms": {k: {s: round(v, 3) for s, v in r.items()} for k, r in results.items()}, "speedup": speedups}))
    return {"ms": results, "speedup": speedups}


if __name__ == "__main__":
    main()
