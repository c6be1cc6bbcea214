"""Every benchmark in one command: a summary table of each figure beside its reference
and its target (issue "Performance"), and one JSON file with everything.

    python -m bench [--out bench/latest.json] [--quick] [--model clip-b32]

Runs, each side by side with its reference in this process: the tokenizer (vs open_clip's
SimpleTokenizer, identical ids), the loader (vs open_clip_train's webdataset pipeline, on
the demo shards, built first if missing), the train step (vs open_clip's CLIP of the
same architecture, fp32, bf16 autocast and our trainer's bf16 engine, on synthetic tensors
and fed from the demo shards by each side's loader; msclip-b32 and msclip-s-b32 vs clip-b32;
token dropping 0.5 against the unmasked step and open_clip's patch_dropout;
FLOPs per sample, TFLOP/s, MFU against a known GPU's spec peak and the share of this machine's
measured matmul rate), the contrastive
loss's memory against the global batch, each fast path on against off, and each
objective's step time against CLIP.
--quick shrinks every workload (a smoke run, minutes instead of tens of minutes).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.cli import command_line

def main(argv=None):
    parser = command_line("python -m bench", __doc__, notes=False)
    parser.add_argument("--out", default="bench/latest.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="clip-b32", help="the train-step comparison's model (clip-*)")
    args = parser.parse_args(argv)
    from bench import (bench_fast_paths, bench_loader, bench_loss_memory, bench_objectives, bench_tokenizer,
                       bench_train)
    from data_prep.demo import build, demo_location
    demo = demo_location()
    if not (demo / "shards" / "digits").exists():
        build(str(demo))
    quick = args.quick
    started = time.time()
    sections = {}
    print("== tokenizer"); sections["tokenizer"] = bench_tokenizer.main(["--captions", "2000" if quick else "20000"])
    print("== loader"); sections["loader"] = bench_loader.main(["--shards", str(demo / "shards" / "digits"), "--workers", "2",
                                                                "--batches", "20" if quick else "60"])
    print("== train step")
    train_results, train_ratios = bench_train.main(
        ["--model", args.model, "--batch-size", "4" if quick else "8", "--steps", "1" if quick else "2",
         "--repeats", "1" if quick else "2", "--memory", "--shards", str(demo / "shards" / "digits"),
         "--precisions", "fp32,bf16,bf16_engine",
         "--variants", "" if quick else args.model.replace("clip-", "msclip-") + "," + args.model.replace("clip-", "msclip-s-")])
    sections["train"] = {"results": train_results, "ratios": train_ratios}
    print("== train step with token dropping (FLIP)")
    drop_results, drop_ratios = bench_train.main(
        ["--model", args.model, "--batch-size", "4" if quick else "8", "--steps", "1" if quick else "2",
         "--repeats", "1" if quick else "2", "--precisions", "fp32,bf16", "--token-drop", "0.5",
         "--variants", args.model.replace("clip-", "msclip-s-")])
    sections["token_drop"] = {"results": drop_results, "ratios": drop_ratios}
    print("== contrastive loss memory")
    rows, growth = bench_loss_memory.main(["--worlds", "1,2,4" if quick else "1,2,4,8,16"])
    sections["loss_memory"] = {"rows": rows, "summary": growth}
    print("== fast paths")
    sections["fast_paths"] = bench_fast_paths.main(["--repeats", "1" if quick else "3"] + (["--quick"] if quick else []))
    print("== objectives")
    sections["objectives"] = bench_objectives.main(["--steps", "2" if quick else "10", "--repeats", "1" if quick else "3"])

    tokenizer_ratio = min(r["ratio"] for r in sections["tokenizer"].values())
    summary = [
        ("train step fp32, ours / open_clip", train_ratios.get("ours/open_clip fp32"), ">= 1.2"),
        ("train step bf16, ours / open_clip", train_ratios.get("ours/open_clip bf16"), ">= 1.2"),
        ("train step, ours bf16 / open_clip fp32", train_ratios.get("ours bf16/open_clip fp32"), ">= 1.8"),
        ("train step, ours bf16 (the trainer's engine) / open_clip amp_bf16",
         train_ratios.get("ours bf16_engine/open_clip bf16"), ">= 1.2"),
        *((f"token drop 0.5, {name} / unmasked, {p}", drop_ratios.get(f"{name} drop 0.5/{name} {p}"), target)
          for p in ("fp32", "bf16") for name, target in (("ours", ">= 1.8"),
                                                        (args.model.replace("clip-", "msclip-s-"), ">= 1.6"))),
        *((f"token drop 0.5, ours / open_clip patch_dropout, {p}",
           drop_ratios.get(f"ours drop/open_clip patch_dropout 0.5 {p}"), ">= 1.0") for p in ("fp32", "bf16")),
        ("train step fp32 from the demo shards, ours / open_clip", train_ratios.get("ours/open_clip fp32, from shards"), ">= 1.2"),
        ("train step bf16 from the demo shards, ours / open_clip", train_ratios.get("ours/open_clip bf16, from shards"), ">= 1.2"),
        ("loader per worker, ours / open_clip", sections["loader"]["ratio"], ">= 1.0"),
        ("tokenizer (slowest workload), ours / open_clip", tokenizer_ratio, ">= 2.0"),
        ("loss memory growth, local path (x world doubling)", growth["local_mib_growth"], f"~{growth['world_growth']:.0f} (linear)"),
        ("loss memory growth, full matrix (x world doubling)", growth["full_mib_growth"], f"~{growth['world_growth'] ** 2:.0f} (quadratic)"),
        *((f"fast path {name} (speed-up on/off)", value, "> 1 to be worth it")
          for name, value in sections["fast_paths"]["speedup"].items()),
    ]
    print(f"\n== summary ({(time.time() - started) / 60:.1f} min)")
    print(f"{'figure':<58} {'value':>7}  target")
    for name, value, target in summary:
        print(f"{name:<58} {value if value is None else round(value, 2)!s:>7}  {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "sections": sections,
                                          "summary": {n: v for n, v, _ in summary}}, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
