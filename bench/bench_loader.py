"""Loader throughput: ours against open_clip's webdataset pipeline
(`open_clip_train.data.get_wds_dataset`), same shards, batch size, workers, image size.

    python -m bench.bench_loader [--shards data/demo/shards/digits] [--workers 2] [--batch-size 64]
                                 [--image-size 64] [--batches 60] [--repeats 3] [--remote s3]

Both decode JPEGs to RGB, random-resized-crop (scale 0.9-1, bicubic), tokenize to 77
tokens and batch inside the workers. open_clip normalizes in the workers; ours by default
ships uint8 pixels (data.uint8_batches) that the trainer normalizes on its device: here
the consuming process normalizes them on the CPU inside the timed loop (what a CPU run
pays), and ours with float batches is measured too. Runs alternate between the loaders;
the best of --repeats is kept (this machine is shared and noisy). The first batches of
each run (worker start-up) are excluded. Prints images/s in total and per worker, and
the ratios to open_clip.

--remote s3 measures remote reads instead: the shards are uploaded to an S3-compatible
server on loopback (moto's server mode, data_prep.serve.LoopbackS3) and ours streams them
from s3:// (the training reader's opener, pipeline/data/remote.py) against the same
shards on local disk, both with --readers virtual readers, alternating; it also prints
the most connections to the store that one loader process held open at once (every
virtual reader holds its current shard open).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip_train.data import get_wds_dataset

from data_prep.demo import demo_location
from pipeline.cli import command_line
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


def most_open_streams(shards: str, args, batches: int = 20) -> int:
    """The most remote streams one process holds open at once: the stream read in this
    process (no loader workers), so all --readers virtual readers live here; a loader
    worker holds its share (readers / workers)."""
    from pipeline.data.remote import open_streams
    stream = our_stream(shards, args.batch_size, 0, args.image_size, readers=args.readers)
    most = 0
    for i, _ in enumerate(stream):
        most = max(most, open_streams())
        if i + 1 == batches:
            break
    return most


def remote(args) -> dict:
    """Ours from s3:// (a loopback S3-compatible server) against ours from local disk."""
    import tempfile

    from data_prep.serve import LoopbackS3
    with tempfile.TemporaryDirectory() as tmp:
        store = LoopbackS3(Path(tmp) / "moto.log").start()
        try:
            parts = [p.strip() for p in args.shards.split("::")]
            for i, part in enumerate(parts):
                store.upload(Path(part), f"shards/{i}")
            on_s3 = "::".join(store.url(f"shards/{i}") for i in range(len(parts)))
            best = {"local": 0.0, "s3": 0.0}
            for _ in range(args.repeats):
                best["local"] = max(best["local"], ours(args.shards, args))
                best["s3"] = max(best["s3"], ours(on_s3, args))
            most = most_open_streams(on_s3, args)
        finally:
            store.stop()
    result = {"local_images_per_s": best["local"], "s3_images_per_s": best["s3"],
              "ratio_s3_to_local": best["s3"] / best["local"], "most_open_streams_per_process": most,
              "readers": args.readers, "workers": args.workers, "batch_size": args.batch_size}
    print(f"loader from s3:// ({args.readers} virtual readers, {args.workers} workers, batch {args.batch_size}, "
          f"{args.image_size}px): {best['s3']:,.0f} img/s from a loopback S3 server, {best['local']:,.0f} img/s from "
          f"local disk; ratio s3/local {result['ratio_s3_to_local']:.2f}x; {most} remote streams open at once in "
          f"one process holding all {args.readers} readers (a loader worker holds its share)")
    return result


def main(argv=None) -> dict:
    parser = command_line("python -m bench.bench_loader", __doc__, notes=False)
    parser.add_argument("--shards", default=str(demo_location() / "shards" / "digits"),
                        help="default: the demo's (MSCLIP_DEMO_DATA, else data/demo of the checkout)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=64,
                        help="data.readers (virtual readers); --readers WORKERS is one reader per worker")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remote", choices=["s3"], help="time s3:// reads against local disk instead (see above)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(args.shards.split("::")[0]).exists():
        raise SystemExit(f"{args.shards}: no shards; build the demo data first: python -m data_prep.demo")
    torch.set_num_threads(1)
    if args.remote:
        result = remote(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
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
