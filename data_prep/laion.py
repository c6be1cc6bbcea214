"""LAION metadata parquet -> url/caption parquet (`key, url, caption`), on DuckDB.

    python -m data_prep.laion --input 'laion400m-meta/part-*.parquet' --output laion.parquet \
        [--min-similarity 0.28] [--min-side 64] [--nsfw UNLIKELY] [--max-punsafe 0.5] \
        [--sample 20000000 --seed 0] [--memory-limit 4GB] [--threads N]

Reads LAION-400M (SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity) and
LAION-5B style (URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe, pwatermark)
metadata; column names are matched case-insensitively, per file. Rules, each drop counted
by reason (the first rule a row fails): CLIP similarity >= --min-similarity; both sides >=
--min-side; NSFW tag in --nsfw (LAION-400M) or punsafe <= --max-punsafe (LAION-5B); a
caption left after HTML stripping and whitespace collapsing; the first occurrence of each
URL (in file order, then row order).

--sample N keeps N distinct URLs chosen uniformly at random by a seeded hash of the URL
(a LAION-20M-style subset): the same seed always selects the same rows, whatever the
order or sharding of the input.

The engine is DuckDB (embedded, multi-threaded, out of core): the rules, the caption
cleaning, the de-duplication and the drop counts are one aggregate over one scan of each
file, streamed into the output (nothing stored between, except with --sample, which needs
every URL's priority before it writes one). It spills to a temporary directory next to
the output when it outgrows --memory-limit, so LAION-5B's de-duplication runs on a node
whose memory is far smaller than the URL set. Python touches only what SQL cannot
express exactly: html.unescape of captions that contain '&', and the seeded URL hash of
--sample (pandas' vectorized SipHash, so the selection equals the earlier implementation's,
data_prep/laion_pandas.py, which tests/test_data_prep.py runs side by side).
"""
from __future__ import annotations

import html
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa

from data_prep.laion_pandas import OUTPUT_COLUMNS, column_map, resolve_inputs, url_priority
from pipeline.cli import command_line

# Python's `\s` (str.isspace) but the space, as an RE2 class: what clean_text collapses
WHITESPACE = (r"[\t\n\x{0b}\x{0c}\r\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}"
              r"\x{202f}\x{205f}\x{3000}]")
TAG = "<[^>]{0,500}>"  # data_prep/common.py clean_text's tag pattern


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def number(column: str, missing: float) -> str:
    """A numeric column as pandas' fillna(missing) sees it: NULL and NaN are `missing`."""
    return f"(CASE WHEN {column} IS NULL OR isnan({column}::DOUBLE) THEN {missing} ELSE {column}::DOUBLE END)"


def file_query(index: int, path: str, rules: dict) -> str:
    """One scan of one file: every row's position, URL, key, the first rule it fails
    (`reason`; NULL when it passed every rule) and, for rows that passed, the cleaned
    caption (nothing is cleaned for a dropped row). Rules whose column the file lacks are
    skipped for that file."""
    cols = column_map(path)
    if rules["min_similarity"] > 0 and "similarity" not in cols:
        raise SystemExit(f"error: {path}: no similarity column; pass --min-similarity 0 to skip that filter")

    def col(name: str) -> str:
        return '"' + cols[name].replace('"', '""') + '"'

    checks = [(f"{col('url')} IS NULL OR length({col('url')}::VARCHAR) = 0", "dropped_no_url")]
    if rules["min_similarity"] > 0:
        checks.append((f"{number(col('similarity'), -1)} < {rules['min_similarity']!r}", "dropped_low_similarity"))
    for side in ("width", "height"):
        if rules["min_side"] > 0 and side in cols:
            checks.append((f"{number(col(side), 0)} < {rules['min_side']}", "dropped_small"))
    if "nsfw" in cols:
        allowed = ", ".join(sql_string(t) for t in sorted(rules["nsfw"])) or "NULL"
        checks.append((f"upper(coalesce({col('nsfw')}::VARCHAR, '')) NOT IN ({allowed})", "dropped_nsfw"))
    if "punsafe" in cols:
        checks.append((f"{number(col('punsafe'), 1.0)} > {rules['max_punsafe']!r}", "dropped_nsfw"))
    reason = "CASE " + " ".join(f"WHEN {cond} THEN '{why}'" for cond, why in checks) + " ELSE NULL END"
    source = f"read_parquet({sql_string(path)}, file_row_number = true)"
    url = f"{col('url')}::VARCHAR"
    key = (f"coalesce({col('sample_id')}::VARCHAR, left(sha1({url}), 16))" if "sample_id" in cols
           else f"left(sha1({url}), 16)")
    # clean_text: tags -> " ", then html.unescape (Python, only where there is an entity
    # to decode), then whitespace runs -> " ", stripped; each step only where it can
    # change the caption (a regex over every caption costs more than the rest together),
    # and only on rows that passed the rules (CASE evaluates a branch on its rows alone)
    text = f"coalesce({col('text')}::VARCHAR, '')"
    stripped = f"CASE WHEN contains({text}, '<') THEN regexp_replace({text}, '{TAG}', ' ', 'g') ELSE {text} END"
    unescaped = "CASE WHEN contains(stripped, '&') THEN py_html_unescape(stripped) ELSE stripped END"
    caption = (f"CASE WHEN regexp_matches(unescaped, '{WHITESPACE}| {{2}}|^ | $') "
               f"THEN trim(regexp_replace(unescaped, '[ {WHITESPACE[1:]}+', ' ', 'g'), ' ') ELSE unescaped END")
    position = f"{index}::BIGINT * {1 << 40} + file_row_number"
    return (f"SELECT position, url, key, reason, CASE WHEN reason IS NULL THEN {caption} END AS caption FROM ("
            f"SELECT *, CASE WHEN reason IS NULL THEN {unescaped} END AS unescaped FROM ("
            f"SELECT position, url, key, reason, CASE WHEN reason IS NULL THEN {stripped} END AS stripped FROM ("
            f"SELECT {position} AS position, {url} AS url, {key} AS key, {reason} AS reason, * FROM {source})))")


def html_unescape(texts: pa.Array) -> pa.Array:
    return pa.array([None if t is None else html.unescape(t) for t in texts.to_pylist()], pa.string())


def memory_per_thread(con) -> float:
    """DuckDB's memory limit over its threads, in bytes."""
    limit, threads = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall()[0]
    number, unit = limit.split()
    scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
             "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]
    return float(number) * scale / int(threads)


def connect(database: str, memory_limit: str, threads: int, seed: int):
    # nothing is fetched at run time (offline nodes): a function name that matches an
    # extension's must not trigger its download
    con = duckdb.connect(database, config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if memory_limit:
        con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = false")  # the output is a set of rows; order costs memory
    con.execute(f"SET enable_progress_bar = {str(sys.stdout.isatty()).lower()}")  # not into logs
    con.create_function("py_html_unescape", html_unescape, ["VARCHAR"], "VARCHAR", type="arrow",
                        side_effects=False)

    def priority(urls: pa.Array) -> pa.Array:
        return pa.array(url_priority(urls.to_numpy(zero_copy_only=False), seed), pa.uint64())

    con.create_function("url_priority", priority, ["VARCHAR"], "UBIGINT", type="arrow", side_effects=False)
    return con


# The one aggregate: a group per URL of the rows that passed every rule and kept a caption
# (the first occurrence's key and caption, and how many rows had that URL), and a group
# per drop reason (its count), so the drop counts come from the same scan as the output.
GROUPED = ("SELECT coalesce(reason, CASE WHEN caption = '' THEN 'dropped_empty_caption' END) AS dropped, "
           "CASE WHEN reason IS NULL AND caption <> '' THEN url END AS url, min_by(key, position) AS key, "
           "min_by(caption, position) AS caption, count(*) AS n FROM {source} GROUP BY ALL")


def convert(input_pattern: str, output_path: str, min_similarity: float = 0.28, min_side: int = 0,
            nsfw: tuple[str, ...] = ("UNLIKELY",), max_punsafe: float = 0.5, sample: int | None = None,
            seed: int = 0, memory_limit: str = "", threads: int = 0) -> Counter:
    paths = resolve_inputs(input_pattern)
    rules = {"min_similarity": min_similarity, "min_side": min_side, "nsfw": {t.upper() for t in nsfw},
             "max_punsafe": max_punsafe}
    rows = " UNION ALL ".join(file_query(i, p, rules) for i, p in enumerate(paths))
    output = Path(output_path)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        spill = tempfile.mkdtemp(prefix=".duckdb-spill-", dir=output.parent)
    except OSError as e:
        raise SystemExit(f"error: --output {output}: cannot write there ({e.strerror})") from None
    partial = output.with_name(output.name + ".tmp")
    try:
        # a database file in the scratch directory: what outgrows memory_limit goes to disk
        con = connect(str(Path(spill) / "work.duckdb"), memory_limit, threads, seed)
        source = f"({rows})"
        # Straight from the parquet scan, the aggregate needs ~128 MB per thread to spill (at
        # 64 MB per thread it ran out of memory instead: tests/test_data_prep.py's 128 MB
        # case on 2 threads); below that it reads a stored table of the scan.
        if memory_per_thread(con) < 128 << 20:
            con.execute(f"CREATE TABLE scanned AS SELECT * FROM {source}")
            source = "scanned"
        grouped = GROUPED.format(source=source)
        if sample is None:
            stats = stream_kept(con.sql(grouped).to_arrow_reader(1 << 17), partial)
        else:
            stats = write_sample(con, grouped, sample, partial)
        con.close()
        partial.replace(output)
    except duckdb.Error as e:  # a file that breaks off mid-way, a full disk: DuckDB names the file
        raise SystemExit(f"error: {' '.join(str(e).split())[:300]}") from None
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)
    return +stats


def stream_kept(batches, path: Path) -> Counter:
    """The aggregate's URL groups into the parquet as they come; its reason groups (a few
    rows) into the counts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    stats: Counter = Counter()
    candidates = 0  # rows that passed every rule and kept a caption
    schema = pa.schema([(name, pa.string()) for name in OUTPUT_COLUMNS])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            dropped = batch.column("dropped")
            kept = pc.is_null(dropped)
            for reason, n in zip(dropped.filter(pc.invert(kept)).to_pylist(),
                                 batch.column("n").filter(pc.invert(kept)).to_pylist()):
                stats[reason] += n
            urls = pa.Table.from_batches([batch]).filter(kept)
            stats["kept"] += urls.num_rows
            candidates += pc.sum(urls.column("n")).as_py() or 0
            writer.write_table(urls.select(OUTPUT_COLUMNS).cast(schema))
    stats["input_rows"] = sum(stats.values()) - stats["kept"] + candidates
    stats["dropped_duplicate_url"] = candidates - stats["kept"]
    return stats


def write_sample(con, grouped: str, sample: int, path: Path) -> Counter:
    """--sample: the URL groups kept as a table, to find the priority of the sample-th
    distinct URL before any is written."""
    con.execute(f"CREATE TABLE groups AS {grouped}")
    stats = Counter(dict(con.execute("SELECT dropped, sum(n) FROM groups WHERE dropped IS NOT NULL GROUP BY dropped"
                                     ).fetchall()))
    con.execute("CREATE TABLE urls AS SELECT * EXCLUDE (dropped) FROM groups WHERE dropped IS NULL")
    candidates = con.execute("SELECT coalesce(sum(n), 0) FROM urls").fetchone()[0]
    con.execute("ALTER TABLE urls ADD COLUMN p UBIGINT")
    con.execute("UPDATE urls SET p = url_priority(url)")
    stats["sample_candidates"] = con.execute("SELECT count(DISTINCT p) FROM urls").fetchone()[0]
    where = ""
    if stats["sample_candidates"] > sample:
        threshold = con.execute(f"SELECT DISTINCT p FROM urls ORDER BY p LIMIT 1 OFFSET {sample - 1}").fetchone()[0]
        where = f"WHERE p <= {threshold}"
    sampled, kept = con.execute(f"SELECT coalesce(sum(n), 0), count(*) FROM urls {where}").fetchone()
    con.execute(f"COPY (SELECT {', '.join(OUTPUT_COLUMNS)} FROM urls {where}) TO {sql_string(str(path))} "
                f"(FORMAT parquet)")
    stats["input_rows"] = sum(stats.values()) - stats["sample_candidates"] + candidates
    stats.update(kept=kept, dropped_not_sampled=candidates - sampled, dropped_duplicate_url=sampled - kept)
    return stats


def main(argv=None):
    parser = command_line("python -m data_prep.laion", __doc__)
    parser.add_argument("--input", required=True, help="parquet file(s): a glob, or a comma-separated list")
    parser.add_argument("--output", required=True, help="parquet to write (key, url, caption)")
    parser.add_argument("--min-similarity", type=float, default=0.28, help="CLIP image-text similarity floor (0.28)")
    parser.add_argument("--min-side", type=int, default=0, help="drop images whose WIDTH or HEIGHT is smaller (0)")
    parser.add_argument("--nsfw", default="UNLIKELY", help="comma-separated NSFW tags to keep (UNLIKELY)")
    parser.add_argument("--max-punsafe", type=float, default=0.5, help="LAION-5B punsafe ceiling (0.5)")
    parser.add_argument("--sample", type=int, help="keep this many distinct URLs, chosen by seeded hash")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="", help="DuckDB's memory ceiling, e.g. 4GB (default: 80%% of RAM); "
                                                           "beyond it the query spills next to --output")
    parser.add_argument("--threads", type=int, default=0, help="DuckDB threads (default: every core)")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be >= 1")
    stats = convert(args.input, args.output, args.min_similarity, args.min_side, tuple(args.nsfw.split(",")),
                    args.max_punsafe, args.sample, args.seed, args.memory_limit, args.threads)
    print(" ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
