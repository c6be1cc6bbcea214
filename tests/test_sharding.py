"""The real img2dataset against a loopback HTTP server: shards, manifest, failures by
reason, and the verify command."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data_prep.serve import serve_directory
from pipeline.data.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
N_GOOD, N_MISSING = 60, 4


def tar_sample_counts(directory: Path) -> dict[str, int]:
    counts = {}
    for tar in sorted(directory.glob("*.tar")):
        with tarfile.open(tar) as t:
            counts[tar.name] = len({Path(m.name).stem for m in t.getmembers() if m.name.endswith(".jpg")})
    return counts


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2d")
    served = root / "www"
    served.mkdir()
    digits = load_digits()
    for i in range(N_GOOD):
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((64, 64)).convert("RGB").save(served / f"{i}.png")
    (served / "notes.txt").write_text("this is not an image")
    jpeg = io.BytesIO()
    Image.fromarray((digits.images[0] * 15).astype(np.uint8)).resize((256, 256)).convert("RGB").save(jpeg, "JPEG")
    (served / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    with serve_directory(served) as base:
        urls = ([f"{base}/{i}.png" for i in range(N_GOOD)] + [f"{base}/missing_{i}.png" for i in range(N_MISSING)]
                + [f"{base}/notes.txt", f"{base}/truncated.jpg"])
        captions = [f"a handwritten digit {digits.target[i % N_GOOD]}" for i in range(len(urls))]
        pq.write_table(pa.table({"key": [str(i) for i in range(len(urls))], "url": urls, "caption": captions,
                                 "tags": ["digit"] * len(urls)}), root / "urls.parquet")
        # The command line a user runs, in a fresh interpreter.
        result = subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", str(root / "urls.parquet"),
                                 "--output", str(root / "shards"), "--image-size", "32", "--samples-per-shard", "25",
                                 "--threads", "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "shards", result.stdout


def test_shards_and_manifest_match_what_is_in_the_tars(sharded):
    shards, _ = sharded
    manifest = Manifest.read(shards)
    in_tars = tar_sample_counts(shards)
    assert {s.name: s.samples for s in manifest.shards} == in_tars
    assert manifest.total_samples == N_GOOD
    with tarfile.open(shards / "00000.tar") as t:
        names = t.getnames()
        sample = names[0].split(".")[0]
        assert {f"{sample}.jpg", f"{sample}.txt", f"{sample}.json"} <= set(names)
        assert t.extractfile(f"{sample}.txt").read().decode().startswith("a handwritten digit")
        assert b'"tags": "digit"' in t.extractfile(f"{sample}.json").read()  # extra columns ride along
        assert max(Image.open(t.extractfile(f"{sample}.jpg")).size) <= 64


def test_failures_are_counted_by_reason(sharded):
    shards, stdout = sharded
    failures = Manifest.read(shards).failures
    assert sum(failures["failed_to_download"].values()) == N_MISSING
    assert any("404" in reason for reason in failures["failed_to_download"])
    assert sum(failures["failed_to_resize"].values()) == 2  # the text file and the truncated JPEG
    assert f"{N_GOOD} samples, {N_MISSING + 2} failed rows" in stdout


def test_verify_passes_good_shards_and_names_a_corrupt_one(sharded, tmp_path):
    shards, _ = sharded
    ok = subprocess.run([sys.executable, "-m", "data_prep.verify", str(shards)], cwd=REPO_ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{N_GOOD} good samples, 0 bad samples" in ok.stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shards.iterdir():
        if f.suffix in (".tar", ".json", ".yaml"):
            (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "00001.tar").read_bytes()
    (broken / "00001.tar").write_bytes(data[: len(data) // 2])
    bad = subprocess.run([sys.executable, "-m", "data_prep.verify", str(broken)], cwd=REPO_ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1
    assert "00001.tar" in bad.stdout and "00000.tar" not in bad.stdout.replace("00000.tar:", "")


def test_rerun_resumes_instead_of_downloading_again(sharded):
    """incremental mode: a finished shard directory is left as it is."""
    shards, _ = sharded
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", str(shards.parent / "urls.parquet"),
                    "--output", str(shards), "--image-size", "32", "--samples-per-shard", "25", "--threads", "8"],
                   cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")} == before


def test_demo_builder_writes_shards_and_held_out_eval(demo_data):
    for source in ("digits", "photos"):
        manifest = Manifest.read(demo_data / "shards" / source)
        assert manifest.total_samples > 0
        assert {s.name: s.samples for s in manifest.shards} == tar_sample_counts(demo_data / "shards" / source)
    evald = demo_data / "eval" / "digits"
    assert (evald / "classnames.txt").read_text().split() == ["zero", "one", "two", "three", "four", "five", "six",
                                                              "seven", "eight", "nine"]
    assert len((evald / "zeroshot_classification_templates.txt").read_text().splitlines()) >= 3
    test_files = sorted((evald / "test").glob("*/*.png"))
    train_files = sorted((evald / "train").glob("*/*.png"))
    assert len(test_files) == 540 and len(train_files) == 1257  # sklearn's 1797 digits, 30% held out
    # Held out: no test scan is among the scans the shards were made from.
    served = {u.rsplit("/", 1)[1].split("_")[1] for u in pq.read_table(demo_data / "urls_digits.parquet")["url"].to_pylist()}
    assert not served & {f.stem for f in test_files}


def test_shards_written_to_and_verified_on_an_s3_store(sharded, s3_server):
    """Issue 32: the same command writes to s3:// (img2dataset through fsspec, the manifest
    beside the shards) on a real S3-compatible server, with the credentials and endpoint
    from the standard AWS variables; data_prep.verify reads them back from there."""
    import yaml
    local, _ = sharded
    out = s3_server.url("i2d/shards")
    table = pq.read_table(local.parent / "urls.parquet").to_pydict()
    with serve_directory(local.parent / "www") as base:  # the same images, served again
        table["url"] = [f"{base}/{url.rsplit('/', 1)[-1]}" for url in table["url"]]
        pq.write_table(pa.table(table), local.parent / "urls_again.parquet")
        done = subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", str(local.parent / "urls_again.parquet"),
                               "--output", out, "--image-size", "32", "--samples-per-shard", "25", "--threads", "8"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    keys = set(s3_server.keys("i2d/shards/"))
    assert {"i2d/shards/manifest.yaml", "i2d/shards/00000.tar", "i2d/shards/00001.tar"} <= keys
    remote = Manifest.read(out)
    assert {s.name: s.samples for s in remote.shards} == {s.name: s.samples for s in Manifest.read(local).shards}
    assert remote.failures == Manifest.read(local).failures
    assert yaml.safe_load((local / "manifest.yaml").read_text())["total_samples"] == remote.total_samples
    ok = subprocess.run([sys.executable, "-m", "data_prep.verify", out], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{N_GOOD} good samples, 0 bad samples" in ok.stdout


def test_verify_names_a_shard_whose_store_stops_answering(sharded, tmp_path):
    """A shard that stalls mid-read is reported unreadable after --read-timeout x tries,
    not waited on forever (issue 32)."""
    from faulty_store import Fault, FaultyStore
    shards, _ = sharded
    with FaultyStore(shards, {"00001.tar": Fault("stall", after=2048)}) as store:
        done = subprocess.run([sys.executable, "-m", "data_prep.verify", store.url(), "--read-timeout", "1",
                               "--read-retries", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "00001.tar: unreadable tar (no byte in 1 s" in done.stdout or "00001.tar: truncated tar (no byte in 1 s" \
        in done.stdout, done.stdout
    assert "00000.tar:" not in done.stdout
