"""LAION metadata parquet -> url/caption parquet (`key, url, caption`).

    python -m data_prep.laion --input 'laion400m-meta/part-*.parquet' --output laion.parquet \
        [--min-similarity 0.28] [--min-side 64] [--nsfw UNLIKELY] [--max-punsafe 0.5] [--sample 20000000 --seed 0]

Reads LAION-400M (SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity) and
LAION-5B style (URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe, pwatermark)
metadata in record batches; column names are matched case-insensitively. Rules, each
drop counted by reason: CLIP similarity >= --min-similarity; both sides >= --min-side;
NSFW tag in --nsfw (LAION-400M) or punsafe <= --max-punsafe (LAION-5B); a caption left
after HTML stripping and whitespace collapsing; the first occurrence of each URL.

--sample N keeps N distinct URLs chosen uniformly at random by a seeded hash of the URL
(a LAION-20M-style subset): the same seed always selects the same rows, whatever the
order or sharding of the input. It reads the input twice and holds 8 bytes per
filtered row. Without --sample, de-duplication holds a set of the kept URLs' hashes.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.common import ParquetRowWriter, clean_text

OUTPUT_COLUMNS = ["key", "url", "caption"]


def resolve_inputs(pattern: str) -> list[str]:
    paths = sorted(p for part in pattern.split(",") for p in (glob.glob(part) or [part]))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: --input {missing[0]}: no such file")
    return paths


def column_map(path: str) -> dict[str, str]:
    """Lower-case logical name -> the file's actual column name."""
    names = pq.ParquetFile(path).schema_arrow.names
    found = {n.lower(): n for n in names}
    for needed in ("url", "text"):
        if needed not in found:
            raise SystemExit(f"error: {path}: no {needed.upper()} column (columns: {', '.join(names)})")
    return found


def url_priority(urls: np.ndarray, seed: int) -> np.ndarray:
    """A uniform, seed-dependent uint64 per URL; equal URLs get equal values."""
    return pd.util.hash_array(urls, hash_key=f"{seed:016d}"[-16:], categorize=False)


class Filter:
    def __init__(self, min_similarity: float, min_side: int, nsfw: set[str], max_punsafe: float):
        self.min_similarity, self.min_side, self.nsfw, self.max_punsafe = min_similarity, min_side, nsfw, max_punsafe

    def batches(self, paths: list[str], stats: Counter, desc: str):
        """Yield (keys, urls, captions) of rows passing every rule but de-duplication."""
        for path in paths:
            cols = column_map(path)
            wanted = [cols[c] for c in ("sample_id", "url", "text", "width", "height", "similarity", "nsfw", "punsafe")
                      if c in cols]
            pf = pq.ParquetFile(path)
            if self.min_similarity > 0 and "similarity" not in cols:
                raise SystemExit(f"error: {path}: no similarity column; pass --min-similarity 0 to skip that filter")
            for batch in tqdm(pf.iter_batches(columns=wanted, batch_size=65536), desc=f"{desc} {Path(path).name}",
                              total=pf.metadata.num_row_groups, unit=" batches", mininterval=2):
                df = batch.to_pandas()
                df.columns = [c.lower() for c in df.columns]
                n = len(df)
                stats[f"{desc}_rows"] += n
                keep = df["url"].notna().to_numpy() & (df["url"].astype(str).str.len() > 0).to_numpy()
                stats["dropped_no_url"] += int(n - keep.sum())
                keep = self._apply(keep, df, "similarity", lambda s: s.fillna(-1) >= self.min_similarity,
                                   self.min_similarity > 0, stats, "dropped_low_similarity")
                keep = self._apply(keep, df, "width", lambda s: s.fillna(0) >= self.min_side, self.min_side > 0,
                                   stats, "dropped_small")
                keep = self._apply(keep, df, "height", lambda s: s.fillna(0) >= self.min_side, self.min_side > 0,
                                   stats, "dropped_small")
                keep = self._apply(keep, df, "nsfw", lambda s: s.fillna("").str.upper().isin(self.nsfw), True,
                                   stats, "dropped_nsfw")
                keep = self._apply(keep, df, "punsafe", lambda s: s.fillna(1.0) <= self.max_punsafe, True,
                                   stats, "dropped_nsfw")
                df = df[keep]
                captions = [clean_text(t) if isinstance(t, str) else "" for t in df["text"]]
                has_caption = np.array([bool(c) for c in captions], dtype=bool)
                stats["dropped_empty_caption"] += int((~has_caption).sum())
                urls = df["url"].astype(str).to_numpy(dtype=object)[has_caption]
                captions = [c for c, ok in zip(captions, has_caption) if ok]
                if "sample_id" in df:
                    keys = df["sample_id"].astype(str).to_numpy(dtype=object)[has_caption]
                else:
                    keys = np.array([hashlib.sha1(u.encode()).hexdigest()[:16] for u in urls], dtype=object)
                yield keys, urls, captions

    @staticmethod
    def _apply(keep, df, column, rule, enabled, stats, reason):
        if not enabled or column not in df:
            return keep
        passed = rule(df[column]).to_numpy(dtype=bool)
        stats[reason] += int((keep & ~passed).sum())
        return keep & passed


def convert(input_pattern: str, output_path: str, min_similarity: float = 0.28, min_side: int = 0,
            nsfw: tuple[str, ...] = ("UNLIKELY",), max_punsafe: float = 0.5, sample: int | None = None,
            seed: int = 0) -> Counter:
    paths = resolve_inputs(input_pattern)
    rules = Filter(min_similarity, min_side, {t.upper() for t in nsfw}, max_punsafe)
    stats: Counter = Counter()
    threshold = None
    if sample is not None:
        scratch: Counter = Counter()
        priorities = [url_priority(urls, seed) for _, urls, _ in rules.batches(paths, scratch, "pass1")]
        distinct = np.unique(np.concatenate(priorities)) if priorities else np.array([], dtype=np.uint64)
        if len(distinct) > sample:
            threshold = np.partition(distinct, sample - 1)[sample - 1]
        stats["sample_candidates"] = len(distinct)
    seen: set[int] = set()
    with ParquetRowWriter(output_path, OUTPUT_COLUMNS) as out:
        for keys, urls, captions in rules.batches(paths, stats, "input"):
            prio = url_priority(urls, seed)
            for key, url, caption, p in zip(keys, urls, captions, prio.tolist()):
                if threshold is not None and p > threshold:
                    stats["dropped_not_sampled"] += 1
                elif p in seen:
                    stats["dropped_duplicate_url"] += 1
                else:
                    seen.add(p)
                    out.write(key=key, url=url, caption=caption)
                    stats["kept"] += 1
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_prep.laion", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="parquet file(s): a glob, or a comma-separated list")
    parser.add_argument("--output", required=True, help="parquet to write (key, url, caption)")
    parser.add_argument("--min-similarity", type=float, default=0.28, help="CLIP image-text similarity floor (0.28)")
    parser.add_argument("--min-side", type=int, default=0, help="drop images whose WIDTH or HEIGHT is smaller (0)")
    parser.add_argument("--nsfw", default="UNLIKELY", help="comma-separated NSFW tags to keep (UNLIKELY)")
    parser.add_argument("--max-punsafe", type=float, default=0.5, help="LAION-5B punsafe ceiling (0.5)")
    parser.add_argument("--sample", type=int, help="keep this many distinct URLs, chosen by seeded hash")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be >= 1")
    stats = convert(args.input, args.output, args.min_similarity, args.min_side, tuple(args.nsfw.split(",")),
                    args.max_punsafe, args.sample, args.seed)
    print(" ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
