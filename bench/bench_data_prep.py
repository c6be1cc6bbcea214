"""LAION metadata filtering: ours (data_prep.laion, DuckDB) against a bare DuckDB query of the
same rules and against the earlier pandas implementation (data_prep.laion_pandas), in one run.

    python -m bench.bench_data_prep [--rows 2000000] [--files 2] [--duplicates 0.1] [--repeats 1]
        [--threads 0] [--memory-limit ""] [--sample 0] [--skip-pandas]

Generates --rows seeded synthetic LAION-400M-style rows (SAMPLE_ID, URL, TEXT, WIDTH,
HEIGHT, NSFW, similarity; URLs drawn from (1 - --duplicates) x rows distinct ones, so 0.5
repeats about half of them; a few captions with HTML tags and entities) in --files parquet
files, then runs each implementation in its own process (so that each one's peak RSS is
its own), --repeats times alternating, and prints rows/s (the median run), the ratios and
the peak RSS, and whether ours kept the same rows (key, url) as the bare query. The bare
query applies the same thresholds, strips tags and collapses ASCII whitespace in SQL,
decodes no entities and keeps each URL's first row (min_by over the file's index and the row
number, GROUP BY url): the engine's speed with no Python at all, the bound for ours. The
bare_raw query cleans no caption at all (the engine's floor, less work than ours).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.cli import command_line

WORDS = ("a photo of the red car dog cat on in at beach mountain city night with two small big old new "
         "man woman child house tree river sky blue green yellow").split()

RUN = """
import glob, json, sys, time
kind, pattern, output, threads, limit, sample = sys.argv[1:7]
sample = int(sample) or None
import duckdb
from data_prep import laion, laion_pandas  # imports are not the work being timed
started = time.perf_counter()
if kind == "ours":
    laion.convert(pattern, output, min_similarity=0.28, min_side=64, sample=sample, threads=int(threads),
                  memory_limit=limit)
elif kind == "pandas":
    laion_pandas.convert(pattern, output, min_similarity=0.28, min_side=64, sample=sample)
else:
    con = duckdb.connect()
    if int(threads):
        con.execute(f"SET threads = {int(threads)}")
    if limit:
        con.execute(f"SET memory_limit = '{limit}'")
    con.execute("SET preserve_insertion_order = false")
    files = sorted(glob.glob(pattern))  # each file's rows after the previous file's, as ours orders them
    # bare: the captions cleaned as ours cleans them (tags, whitespace); bare_raw: as they are
    cleaned = ("TEXT" if kind == "bare_raw" else
               "trim(regexp_replace(regexp_replace(TEXT, '<[^>]{0,500}>', ' ', 'g'), '\\s+', ' ', 'g'))")
    scans = " UNION ALL ".join(
        f'''SELECT SAMPLE_ID::VARCHAR AS key, URL AS url, {i}::BIGINT * {1 << 40} + file_row_number AS position,
               {cleaned} AS caption
        FROM read_parquet('{path}', file_row_number = true)
        WHERE URL IS NOT NULL AND URL <> '' AND coalesce(similarity, -1) >= 0.28 AND coalesce(WIDTH, 0) >= 64
          AND coalesce(HEIGHT, 0) >= 64 AND upper(coalesce(NSFW, '')) = 'UNLIKELY' ''' for i, path in enumerate(files))
    con.execute(f'''COPY (SELECT min_by(key, position) AS key, url, min_by(caption, position) AS caption
        FROM ({scans}) WHERE caption <> '' GROUP BY url) TO '{output}' (FORMAT parquet)''')
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux carries a parent's peak across exec into ru_maxrss
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024}))
"""


def caption(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
    draw = rng.random()
    if draw < 0.03:
        return f"<b>{text}</b> &amp; more"
    if draw < 0.05:
        return f"{text}  <br/>\n{text}"
    return text


def generate(root: Path, rows: int, files: int, duplicates: float = 0.1, seed: int = 0) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    distinct = max(1, int(rows * (1 - duplicates)))
    per_file = rows // files
    for f in range(files):
        ids = range(f * per_file, (f + 1) * per_file)
        urls = [f"https://img{rng.randint(0, 99)}.example.com/{rng.randrange(distinct):010d}/photo.jpg" for _ in ids]
        pq.write_table(pa.table({
            "SAMPLE_ID": list(ids), "URL": urls, "TEXT": [caption(rng) for _ in ids],
            "HEIGHT": [rng.choice([32, 256, 512]) for _ in ids], "WIDTH": [rng.choice([48, 256, 640]) for _ in ids],
            "LICENSE": ["?"] * per_file, "NSFW": [rng.choice(["UNLIKELY"] * 8 + ["UNSURE", "NSFW"]) for _ in ids],
            "similarity": [rng.uniform(0.2, 0.45) for _ in ids]}), root / f"part-{f:05d}.parquet")
    return str(root / "part-*.parquet")


def run(kind: str, pattern: str, output: Path, args) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, kind, pattern, str(output), str(args.threads),
                           args.memory_limit, str(args.sample)], capture_output=True, text=True)
    if done.returncode:  # e.g. the bare query out of memory under a small --memory-limit: reported, not fatal
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"failed": " ".join(next((l for l in lines if "Error" in l), lines[-1]).split())[:160]}
    return json.loads(done.stdout.splitlines()[-1])


def same_rows(first: Path, second: Path) -> bool:
    import pyarrow.parquet as pq
    pairs = [sorted(zip(*pq.read_table(path, columns=["key", "url"]).to_pydict().values())) for path in (first, second)]
    return pairs[0] == pairs[1]


def main(argv=None):
    parser = command_line("python -m bench.bench_data_prep", __doc__, notes=False)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--duplicates", type=float, default=0.1,
                        help="URLs are drawn from (1 - this) x rows distinct ones (0.5: about half repeat)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; the median is shown")
    parser.add_argument("--threads", type=int, default=0, help="DuckDB threads (0: every core)")
    parser.add_argument("--memory-limit", default="", help="DuckDB memory limit for ours and the bare query")
    parser.add_argument("--sample", type=int, default=0, help="--sample for ours and pandas (the bare query: none)")
    parser.add_argument("--skip-pandas", action="store_true", help="the earlier implementation is slow at scale")
    args = parser.parse_args(argv)
    kinds = ("bare", "bare_raw", "ours") + (() if args.skip_pandas else ("pandas",))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pattern = generate(root, args.rows, args.files, args.duplicates)
        runs: dict[str, list] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(run(kind, pattern, root / f"{kind}.parquet", args))
        results = {}
        for kind, tries in runs.items():
            timed = sorted((r for r in tries if "seconds" in r), key=lambda r: r["seconds"])
            results[kind] = dict(timed[len(timed) // 2]) if timed else tries[-1]
            if timed:
                results[kind].update(rows_per_s=args.rows / results[kind]["seconds"],
                                     all_seconds=[round(r["seconds"], 2) for r in tries if "seconds" in r])
        same = (same_rows(root / "ours.parquet", root / "bare.parquet")
                if not args.sample and all("seconds" in results[k] for k in ("ours", "bare")) else None)
    print(f"{args.rows:,} rows in {args.files} files, {args.duplicates:.0%} of URLs drawn as repeats, threads "
          f"{args.threads or 'all'}, memory limit {args.memory_limit or 'DuckDB default'}, {args.repeats} run(s) each")
    print(f"{'implementation':<16}{'rows/s':>12}{'seconds':>10}{'peak RSS MB':>13}  all runs (s)")
    for kind, r in results.items():
        print(f"{kind:<16}{r['rows_per_s']:>12,.0f}{r['seconds']:>10.1f}{r['peak_rss_mb']:>13.0f}  {r['all_seconds']}"
              if "seconds" in r else f"{kind:<16}failed: {r['failed']}")
    ratios = {f"ours_vs_{kind}": results["ours"]["rows_per_s"] / results[kind]["rows_per_s"]
              for kind in ("bare", "bare_raw", "pandas")
              if "seconds" in results.get(kind, {}) and "seconds" in results["ours"]}
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + "  (targets: >= 0.8x bare, >= 2x pandas; bare_raw "
          "cleans no caption: the engine's floor, not the same work)")
    if same is not None:
        print(f"same rows (key, url) kept by ours and the bare query: {'yes' if same else 'NO'}")
    summary = {"rows": args.rows, "duplicates": args.duplicates, "same_rows": same,
               **{k: {m: round(v, 2) if isinstance(v, float) else v for m, v in r.items()}
                  for k, r in results.items()}, **{k: round(v, 3) for k, v in ratios.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
