"""The LAION metadata filter as it was before DuckDB: pandas over parquet record batches,
a Python set of the kept URLs' hashes for the de-duplication. Kept as the reference that
data_prep/laion.py (the command) must equal row for row (tests/test_data_prep.py) and as
the baseline of bench/bench_data_prep.py; its helpers (input and column resolution, the
seeded URL hash) are shared.

Reads LAION-400M (SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity) and
LAION-5B style (URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe, pwatermark)
metadata in record batches; column names are matched case-insensitively. Rules, each
drop counted by reason: CLIP similarity >= min_similarity; both sides >= min_side;
NSFW tag in nsfw (LAION-400M) or punsafe <= max_punsafe (LAION-5B); a caption left
after HTML stripping and whitespace collapsing; the first occurrence of each URL.

sample=N keeps N distinct URLs chosen uniformly at random by a seeded hash of the URL:
the same seed always selects the same rows, whatever the order or sharding of the input.
It reads the input twice and holds 8 bytes per filtered row; without it, de-duplication
holds a set of the kept URLs' hashes (~50 bytes each: LAION-400M needs ~20 GB).
"""
from __future__ import annotations

import glob
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.common import ParquetRowWriter, clean_text

OUTPUT_COLUMNS = ["key", "url", "caption"]


def resolve_inputs(pattern: str) -> list[str]:
    paths = []
    for part in pattern.split(","):
        found = sorted(glob.glob(part))
        if not found and glob.has_magic(part):
            raise SystemExit(f"error: --input {part}: the pattern matches no file")
        paths += found or [part]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: --input {missing[0]}: no such file")
    return sorted(paths)


def column_map(path: str) -> dict[str, str]:
    """Lower-case logical name -> the file's actual column name."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise SystemExit(f"error: {path}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
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
                if "sample_id" in cols:  # keys as text; a missing one falls back to the URL's hash
                    index = batch.schema.get_field_index(cols["sample_id"])
                    batch = batch.set_column(index, cols["sample_id"], batch.column(index).cast(pa.string()))
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
                ids = df["sample_id"].to_numpy(dtype=object)[has_caption] if "sample_id" in df else [None] * len(urls)
                keys = np.array([i if i is not None else hashlib.sha1(u.encode()).hexdigest()[:16]
                                 for i, u in zip(ids, urls)], dtype=object)
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
