"""Loader throughput: ours against open_clip's webdataset pipeline
(`open_clip_train.data.get_wds_dataset`), same shards, batch size, workers, image size.

    python -m bench.bench_loader [--shards data/demo/shards/digits] [--workers 2] [--batch-size 64]
                                 [--image-size 64] [--batches 60] [--repeats 3]

Both decode JPEGs to RGB, random-resized-crop (scale 0.9-1, bicubic), tokenize to 77
tokens and batch inside the workers. open_clip normalizes in the workers; ours by default
ships uint8 pixels (data.uint8_batches) that the trainer normalizes on its device: here
the consuming process normalizes them on the CPU inside the timed loop (what a CPU run
pays), and ours with float batches is measured too. Runs alternate between the loaders;
the best of --repeats is kept (this machine is shared and noisy). The first batches of
each run (worker start-up) are excluded. Prints images/s in total and per worker, and
the ratios to open_clip.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip_train.data import get_wds_dataset

from pipeline.config import DataConfig
from pipeline.data.loader import DataStream
from pipeline.data.recipe import ImageSpec
from pipeline.pixels import pixels_on_device
from pipeline.data.shards import resolve_shards

WARMUP_BATCHES = 5


def rate(batches, n: int, batch_size: int, consume=lambda batch: batch) -> float:
    it = iter(batches)
    for _ in range(WARMUP_BATCHES):
        next(it)
    start = time.perf_counter()
    for _ in range(n):
        consume(next(it))
    return n * batch_size / (time.perf_counter() - start)


def our_stream(shards: str, batch_size: int, workers: int, image_size: int, uint8: bool = True,
               context_length: int = 77, readers: int = 64) -> DataStream:
    cfg = DataConfig(train_shards=shards, workers=workers, resampled=True, shuffle_buffer=1000, readers=readers)
    return DataStream(cfg, batch_size=batch_size, image=ImageSpec(image_size, "clip"),
                      context_length=context_length, uint8=uint8)


def open_clip_loader(shards: str, batch_size: int, workers: int, image_size: int, context_length: int = 77):
    """open_clip_train's training loader over the same shards: (images, texts) batches."""
    shard_set = resolve_shards(shards)
    ns = SimpleNamespace(train_data="::".join(shard_set.urls), val_data=None, dataset_resampled=True,
                         train_num_samples=10 ** 7, train_data_upsampling_factors=None, seed=0, world_size=1,
                         batch_size=batch_size, workers=workers)
    preprocess = open_clip.image_transform(image_size, is_train=True)  # RRC(0.9, 1), bicubic, CLIP mean/std
    return get_wds_dataset(ns, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=context_length)).dataloader


def ours(shards: str, args, uint8: bool = True) -> float:
    stream = our_stream(shards, args.batch_size, args.workers, args.image_size, uint8, readers=args.readers)
    return rate(stream, args.batches, args.batch_size, lambda batch: pixels_on_device(batch, torch.device("cpu")))


def reference(shards: str, args) -> float:
    return rate(open_clip_loader(shards, args.batch_size, args.workers, args.image_size), args.batches, args.batch_size)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/demo/shards/digits")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=64,
                        help="data.readers (virtual readers); --readers WORKERS is one reader per worker")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(args.shards.split("::")[0]).exists():
        raise SystemExit(f"{args.shards}: no shards; build the demo data first: python -m data_prep.demo")
    torch.set_num_threads(1)
    best = {"ours": 0.0, "ours_float": 0.0, "open_clip": 0.0}
    for _ in range(args.repeats):
        best["ours"] = max(best["ours"], ours(args.shards, args))
        best["ours_float"] = max(best["ours_float"], ours(args.shards, args, uint8=False))
        best["open_clip"] = max(best["open_clip"], reference(args.shards, args))
    workers = max(1, args.workers)
    result = {"ours_images_per_s": best["ours"], "ours_float_images_per_s": best["ours_float"],
              "open_clip_images_per_s": best["open_clip"],
              "ours_per_worker": best["ours"] / workers, "open_clip_per_worker": best["open_clip"] / workers,
              "ratio": best["ours"] / best["open_clip"], "ratio_float": best["ours_float"] / best["open_clip"],
              "uint8_speedup": best["ours"] / best["ours_float"],
              "workers": args.workers, "batch_size": args.batch_size, "image_size": args.image_size}
    print(f"loader ({args.workers} workers, batch {args.batch_size}, {args.image_size}px): "
          f"ours {best['ours']:,.0f} img/s ({result['ours_per_worker']:,.0f}/worker, uint8 batches normalized by the "
          f"consumer), ours with float batches {best['ours_float']:,.0f} img/s, "
          f"open_clip {best['open_clip']:,.0f} img/s ({result['open_clip_per_worker']:,.0f}/worker); "
          f"ratio {result['ratio']:.2f}x (float batches {result['ratio_float']:.2f}x; uint8 buys "
          f"{result['uint8_speedup']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
