"""Curation on a noisy pool: how much planted noise `data_prep.curate` finds, how fast it
embeds, and what training on the curated pool gives against the uncurated one.

    python -m bench.curation [--demo DIR] [--scorer-steps 300] [--top-fraction 0.8]
        [--dedup-threshold 0.97] [--dedup-hash-bits 6] [--seeds 0,1,2] [--train-steps 100]
        [--skip-training]

The pool: the demo's digit shards with 20% of the pairs' captions swapped between samples
of different digits and near-copies of 10% of the images (bench/noisy_pool.py). The scorer:
msclip-s-tiny trained --scorer-steps on the clean demo shards. Prints the share of swapped
pairs dropped, of near-duplicate pairs dropped (the copy or its original: the issue's
measure) and halved (exactly one of the two kept), of clean samples kept,
and the embedding throughput of one process. Then, per seed, msclip-s-tiny trains
--train-steps on the uncurated pool and on the curated one (the same steps, batch and
schedule), each a run in an MLflow store with its zero-shot top-1 on the held-out digits,
and `python -m eval.compare` prints them grouped over seeds (mean +- std).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pipeline.cli import command_line


def noise_found(planted, kept: set[str]) -> dict:
    return {"swapped_dropped": len(planted.swapped - kept) / len(planted.swapped),
            "duplicates_dropped": sum(c not in kept or o not in kept for c, o in planted.copies.items())
            / len(planted.copies),
            "duplicate_pairs_halved": sum((c in kept) != (o in kept) for c, o in planted.copies.items())
            / len(planted.copies),
            "clean_kept": len(planted.clean & kept) / len(planted.clean)}


def main(argv=None) -> int:
    parser = command_line("python -m bench.curation", __doc__, notes=False)
    parser.add_argument("--demo", help="a built demo dataset (default: built here with the tests' settings)")
    parser.add_argument("--scorer-steps", type=int, default=300)
    parser.add_argument("--top-fraction", type=float, default=0.8)
    parser.add_argument("--dedup-threshold", type=float, default=0.97)
    parser.add_argument("--dedup-hash-bits", type=int, default=6, help="-1: the cosine alone")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--skip-training", action="store_true", help="measure the filter only")
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    from bench.demo_training import demo_build_args, train_demo_model
    from bench.noisy_pool import plant_noise
    from data_prep.curate import embed, filter_pool, reshard
    work = Path(tempfile.mkdtemp(prefix="curation-"))
    demo = Path(args.demo) if args.demo else work / "demo"
    if not args.demo:
        from data_prep.demo import main as build_demo
        build_demo(demo_build_args(demo))
    started = time.perf_counter()
    scorer = train_demo_model(demo, work / "scorer.pt", steps=args.scorer_steps)
    print(f"scorer: msclip-s-tiny, {args.scorer_steps} steps on the clean demo shards "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    planted = plant_noise(demo / "shards" / "digits", work / "noisy")
    pool = len(planted.clean) + len(planted.swapped) + 2 * len(planted.copies)
    started = time.perf_counter()
    counts = embed(str(work / "noisy"), str(scorer), str(work / "emb"), batch_size=256, workers=2)
    seconds = time.perf_counter() - started
    summary = filter_pool(str(work / "emb"), str(work / "kept.parquet"), top_fraction=args.top_fraction,
                          dedup_threshold=args.dedup_threshold,
                          dedup_hash_bits=None if args.dedup_hash_bits < 0 else args.dedup_hash_bits)
    kept = set(pq.read_table(work / "kept.parquet").column("uid").to_pylist())
    found = noise_found(planted, kept)
    print(f"pool {pool}: {len(planted.swapped)} swapped, {len(planted.copies)} copies, {len(planted.clean)} clean; "
          f"--top-fraction {args.top_fraction} --dedup-threshold {args.dedup_threshold} --dedup-hash-bits "
          f"{args.dedup_hash_bits}")
    print("  ".join(f"{k} {v:.3f}" for k, v in found.items()) + "  (the issue's targets: swapped and duplicates "
          "dropped >= 0.9, clean kept >= 0.95)")
    print(f"embedding: {counts['embedded']} samples in {seconds:.1f} s, {counts['embedded'] / seconds:.0f} "
          f"samples/s in one process (2 decoding workers, CPU)")
    if args.skip_training:
        return 0
    reshard(str(work / "noisy"), str(work / "kept.parquet"), str(work / "curated"), samples_per_shard=250)
    compare_trainings(demo, work, [int(s) for s in args.seeds.split(",")], args.train_steps, summary)
    return 0


def compare_trainings(demo: Path, work: Path, seeds: list[int], steps: int, summary: dict):
    """Each pool x seed trained and evaluated into one MLflow store, then eval.compare."""
    import mlflow

    from bench.demo_training import train_demo_model
    from eval import zeroshot
    from eval.compare import main as compare
    from eval.data import read_classification
    from pipeline.tracking.store import training_experiment
    from pipeline.weights.export import load_exported
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=training_experiment(mlflow.MlflowClient(), "curation"))
    test = read_classification(demo / "eval" / "digits", "test")
    for pool in ("uncurated", "curated"):
        for seed in seeds:
            path = train_demo_model(demo, work / f"{pool}-{seed}.pt", steps=steps, seed=seed,
                                    shards=str(work / ("noisy" if pool == "uncurated" else "curated")))
            model, _ = load_exported(path)
            acc = zeroshot.evaluate(model.eval(), test, workers=0)["acc1"]
            with mlflow.start_run(run_name=f"{pool}-s{seed}", tags={"model": "msclip-s-tiny"}):
                mlflow.log_params({"data": pool, "train.seed": seed, "train.steps": steps,
                                   "kept": summary["kept"] if pool == "curated" else summary["pool"]})
                mlflow.log_metric("eval/zeroshot/digits/acc1", acc, step=steps)
            print(f"{pool} seed {seed}: zero-shot top-1 {acc:.4f}", flush=True)
    compare(["--experiment", "curation", "--tracking-uri", uri, "--no-plot"])


if __name__ == "__main__":
    sys.exit(main())
