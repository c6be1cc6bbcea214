"""Step-time cost of each training objective relative to plain CLIP: same model, same
batch, one process, forward + backward + AdamW step.

    python -m bench.bench_objectives [--model msclip-s-tiny] [--batch-size 64] [--steps 10] [--repeats 3]
        [--device cpu|cuda] [--full-heads]

Objectives: clip; clip+slip (2 extra SimCLR views through the image trunk, MLP head,
NT-Xent); filip (token projections, token-wise similarity with top-k selection);
clip+filip; declip (2 image views x caption/EDA caption multi-view CLIP, NN queue,
SimSiam, MLM with the mask token's vocabulary: the model is built with it); defilip
(declip + FILIP 0.2); pyramid (PyramidCLIP without regions: 2 crops x 3 text levels,
softened negatives); mixup (ZeroVL's coin-flipping mixup). Random images and real tokenized captions (the data loader is not timed:
bench_loader measures it). Heads are scaled down for the tiny models unless
--full-heads (SLIP 4096/256, FILIP 256, top-16). Runs alternate between objectives and
the best of --repeats is kept (this machine is shared and noisy). Prints ms/step and
the ratio to clip.
"""
from __future__ import annotations

import json
import time

import torch

from pipeline.cli import command_line
from pipeline.config import FilipConfig, ObjectiveConfig, SlipConfig
from pipeline.data.caption_augment import mlm_mask
from pipeline.model import build_model
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.tokenizer import tokenize

DECLIP_VIEWS = {"image_views": 2, "view_augment": "moco", "text_eda": True, "logit_scale_min": 3.0}
DECLIP = {"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2}
OBJECTIVES = {"clip": ({"clip": 1.0}, {}), "clip+slip": ({"clip": 1.0, "slip": 1.0}, {}),
              "filip": ({"filip": 1.0}, {}), "clip+filip": ({"clip": 1.0, "filip": 0.2}, {}),
              "declip": (DECLIP, DECLIP_VIEWS), "defilip": ({**DECLIP, "filip": 0.2}, DECLIP_VIEWS),
              "pyramid": ({"pyramid": 1.0}, {}), "mixup": ({"mixup": 1.0}, {})}


def make_step(name: str, args, batch: dict):
    torch.manual_seed(0)
    weights, views = OBJECTIVES[name]
    heads = {} if args.full_heads else {"slip": SlipConfig(mlp_dim=512, out_dim=128), "filip": FilipConfig(dim=64, top_k=8)}
    cfg = ObjectiveConfig(weights=weights, **views, **heads)
    model = build_model(objective_arch(build_model(args.model).arch, cfg))
    module = TrainModule(model, ComposedObjective(cfg, model.arch)).to(args.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        prepared = module.objective.prepare(batch)  # ZeroVL's pixel mixup
        if "mlm" in weights:  # the loader masks `text` itself for MLM
            prepared = {**prepared, "text": prepared["text_masked"]}
        loss, _ = module(prepared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    return step


def main(argv=None):
    parser = command_line("python -m bench.bench_objectives", __doc__, notes=False)
    parser.add_argument("--model", default="msclip-s-tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-heads", action="store_true")
    args = parser.parse_args(argv)
    arch = build_model(args.model).arch
    g = torch.Generator().manual_seed(0)
    size = arch.image_size
    batch = {key: torch.randn(args.batch_size, 3, size, size, generator=g).to(args.device)
             for key in ("images", "images_1", "ssl_0", "ssl_1")}
    captions = [f"a photo of the handwritten digit {i % 10} " + "on paper " * (i % 4) for i in range(args.batch_size)]
    batch["text"] = tokenize(captions, arch.context_length).to(args.device)
    # DeCLIP's text views: an EDA-like variant and MLM labels (the masked ids replace `text`
    # only for the DeCLIP objectives, as the loader does)
    batch["text_eda"] = tokenize([" ".join(reversed(c.split())) for c in captions], arch.context_length).to(args.device)
    masked, labels = mlm_mask(batch["text"].cpu(), generator=torch.Generator().manual_seed(0))
    batch["text_masked"], batch["mlm_labels"] = masked.to(args.device), labels.to(args.device)
    # PyramidCLIP's other text levels (summary, tags)
    batch["text_summary"] = tokenize([" ".join(c.split()[:5]) for c in captions], arch.context_length).to(args.device)
    batch["text_tags"] = tokenize([", ".join(c.split()[3:6]) for c in captions], arch.context_length).to(args.device)
    steps = {name: make_step(name, args, batch) for name in OBJECTIVES}
    for step in steps.values():  # warm-up: allocator, kernels
        step()
    best = {name: float("inf") for name in OBJECTIVES}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps * 1000)
    print(f"{args.model}, batch {args.batch_size}, {args.device}, best of {args.repeats} x {args.steps} steps")
    print(f"{'objective':<12} {'ms/step':>9} {'x clip':>7}")
    for name in OBJECTIVES:
        print(f"{name:<12} {best[name]:9.1f} {best[name] / best['clip']:7.2f}")
    result = {"model": args.model, "batch_size": args.batch_size, "device": args.device,
              "ms_per_step": {k: round(v, 2) for k, v in best.items()},
              "ratio_to_clip": {k: round(v / best["clip"], 3) for k, v in best.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
