"""The streaming loader: split by rank and worker, deterministic, resumable, and never
dying on bad data."""
import io
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.loader import DataQualityError, DataStream, check_skip_rate
from pipeline.data.recipe import BatchRecipe, ImageSpec
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.data.shards import ShardSet, assign_shards, resolve_shards

from conftest import REPO_ROOT


def stream(shards: str, *, rank=0, world=1, workers=2, resampled=False, shuffle=200, batch=16, seed=0,
           drop_last=False, max_skip_rate=0.5, keep_captions=False, stall_seconds=600.0, readers=4) -> DataStream:
    cfg = DataConfig(train_shards=shards, workers=workers, resampled=resampled, shuffle_buffer=shuffle,
                     max_skip_rate=max_skip_rate, stall_seconds=stall_seconds, readers=readers)
    return DataStream(cfg, batch_size=batch, image=ImageSpec(32, "clip"), context_length=16, seed=seed,
                      rank=rank, world=world, drop_last=drop_last, keep_captions=keep_captions)


def all_keys(directory: Path) -> set[str]:
    keys = set()
    for tar in directory.glob("*.tar"):
        with tarfile.open(tar) as t:
            keys |= {f"{tar}#{Path(m.name).stem}" for m in t.getmembers() if m.name.endswith(".jpg")}
    return keys


def test_two_ranks_two_workers_cover_an_epoch_exactly_once(demo_data):
    shards = demo_data / "shards" / "digits"
    seen = []
    for rank in range(2):
        for batch in stream(str(shards), rank=rank, world=2, workers=2):
            seen += batch["keys"]
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    assert set(seen) == all_keys(shards)


def test_ranks_get_balanced_shares_and_a_common_epoch_length(demo_data):
    s0 = stream(str(demo_data / "shards" / "digits"), rank=0, world=2, drop_last=True)
    s1 = stream(str(demo_data / "shards" / "digits"), rank=1, world=2, drop_last=True)
    assert s0.batches_per_epoch() == s1.batches_per_epoch() > 0
    for s in (s0, s1):  # every rank can really deliver that many batches
        assert sum(1 for _ in s) >= s.batches_per_epoch()


@pytest.mark.parametrize("shards,readers", [(13, 4), (7, 6), (6, 4), (5, 1), (3, 4)])
def test_shard_assignment_is_a_partition(shards, readers):
    s = ShardSet([f"{i}.tar" for i in range(shards)], [100 + i for i in range(shards)])
    for epoch in range(3):
        got = [i for r in range(readers) for i in assign_shards(s, epoch, 0, r, readers)]
        assert sorted(got) == list(range(shards))


def test_same_seed_and_epoch_give_the_same_batches(demo_data):
    spec = f"{demo_data}/shards/digits::{demo_data}/shards/photos"
    a = list(stream(spec, seed=3))
    b = list(stream(spec, seed=3))
    # Messages name the first difference: this test failed twice in ~30 runs (not reproduced
    # since, 2026-11-22); the next failure should say which batch and which field. The
    # epoch-1 check below failed once in CI (2026-12-05), one sample short: the demo's two
    # datasets both number their keys from 00000000 and img2dataset writes them in download
    # order, so on some builds a reader read both shards back to back with the same key at
    # the boundary and joined two samples (test_two_datasets_numbered_alike_...).
    differing = [i for i, (x, y) in enumerate(zip(a, b)) if x["keys"] != y["keys"]]
    assert len(a) == len(b) and not differing, f"{len(a)} vs {len(b)} batches; keys differ at batches {differing[:5]}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x["images"], y["images"]), f"batch {i}: same keys, different images ({x['keys'][:3]})"
        assert torch.equal(x["text"], y["text"]), f"batch {i}: same keys, different tokens"
    s = stream(spec, seed=3)
    s.next_epoch()
    other_epoch = list(s)
    assert [x["keys"] for x in other_epoch] != [x["keys"] for x in a], "epoch 1 repeats epoch 0's order"
    assert sorted(k for x in other_epoch for k in x["keys"]) == sorted(k for x in a for k in x["keys"]), \
        f"epoch 1 covers {sum(len(x['keys']) for x in other_epoch)} samples, epoch 0 {sum(len(x['keys']) for x in a)}"


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_exactly_where_the_stream_stood(demo_data, resampled):
    spec = str(demo_data / "shards" / "digits")
    straight = stream(spec, resampled=resampled)
    full = []
    for batch in straight:
        full.append(batch)
        if len(full) == 12:
            break
    first = stream(spec, resampled=resampled)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    del it
    resumed = stream(spec, resampled=resampled)
    resumed.load_state_dict(state)
    rest = [b for b, _ in zip(resumed, range(7))]
    for x, y in zip(full[5:], rest):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["images"], y["images"])  # same augmentations too


def test_resampled_stream_is_endless_and_weighted(demo_data):
    spec = f"{demo_data}/shards/digits::{demo_data}/shards/photos"
    s = stream(spec, resampled=True, workers=1, shuffle=0)
    counts = Counter()
    for batch, _ in zip(s, range(60)):
        counts.update("photos" if "photos" in k else "digits" for k in batch["keys"])
    share = counts["photos"] / sum(counts.values())
    expected = 20 / (20 + 1257)  # shards are drawn in proportion to their sample counts
    assert sum(counts.values()) == 60 * 16 and share < 5 * expected + 0.02


# ---- bad data ------------------------------------------------------------------------

def jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (value, 255 - value, 50)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@pytest.fixture
def dirty_shards(tmp_path):
    """Good samples mixed with every kind of bad data the loader must survive."""
    good = [{"__key__": f"good{i:03d}", "jpg": jpeg_bytes(i), "txt": f"a good caption {i}"} for i in range(40)]
    truncated_jpeg = jpeg_bytes(7)[:200]
    bad = [
        {"__key__": "undecodable", "jpg": b"this is not a jpeg at all", "txt": "bad image"},
        {"__key__": "truncatedjpeg", "jpg": truncated_jpeg, "txt": "truncated image"},
        {"__key__": "zerobyteimage", "jpg": b"", "txt": "empty image"},
        {"__key__": "nocaption", "jpg": jpeg_bytes(1)},
        {"__key__": "emptycaption", "jpg": jpeg_bytes(2), "txt": "   "},
        {"__key__": "zerobytecaption", "jpg": jpeg_bytes(3), "txt": b""},
        {"__key__": "noimage", "txt": "text without an image"},
    ]
    write_tar(tmp_path / "00000.tar", good[:20] + bad[:4])
    write_tar(tmp_path / "00001.tar", good[20:] + bad[4:])
    # A tar cut after its 15th sample: those 15 are fine to read, the rest is lost.
    write_tar(tmp_path / "full2.tar", [{"__key__": f"cut{i:03d}", "jpg": jpeg_bytes(i), "txt": "x"} for i in range(30)])
    with tarfile.open(tmp_path / "full2.tar") as t:
        last = t.getmember("cut014.txt")
    data = (tmp_path / "full2.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: last.offset_data + -(-last.size // 512) * 512])
    (tmp_path / "full2.tar").unlink()
    (tmp_path / "00003.tar").write_bytes(b"this is not a tar file" * 50)  # not a tar
    (tmp_path / "00004.tar").write_bytes(b"")  # zero-byte file
    Manifest([ShardInfo("00000.tar", 20), ShardInfo("00001.tar", 20), ShardInfo("00002.tar", 30),
              ShardInfo("00003.tar", 10), ShardInfo("00004.tar", 10)]).write(str(tmp_path))
    return tmp_path, {f"{tmp_path / ('00000.tar' if i < 20 else '00001.tar')}#good{i:03d}" for i in range(40)}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_good_sample_arrives_and_every_bad_one_is_counted(dirty_shards, workers):
    directory, good_keys = dirty_shards
    s = stream(str(directory), workers=workers, max_skip_rate=1.0)
    seen = [k for batch in s for k in batch["keys"]]
    assert len(seen) == len(set(seen))
    assert good_keys <= set(seen)
    assert set(seen) - good_keys == {f"{directory / '00002.tar'}#cut{i:03d}" for i in range(15)}  # the cut tar's
    skipped = s.skipped()
    # a shard that breaks off counts the samples its manifest lists beyond those read:
    # 00002.tar lost 15 of 30, 00003.tar and 00004.tar (unreadable) 10 each
    assert skipped == Counter(undecodable_image=2, empty_image=1, missing_caption=1, empty_caption=2,
                              missing_image=1, truncated_shard=15, unreadable_shard=20), skipped


def test_skip_rate_ceiling_stops_with_a_clear_message(tmp_path):
    samples = [{"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i % 250) if i % 2 else b"garbage", "txt": "caption"}
               for i in range(400)]
    write_tar(tmp_path / "00000.tar", samples)
    Manifest([ShardInfo("00000.tar", 400)]).write(str(tmp_path))
    with pytest.raises(DataQualityError, match=r"skipped \d+ of \d+ samples .*max_skip_rate=0.1: undecodable_image="):
        for _ in stream(str(tmp_path), workers=0, max_skip_rate=0.1):
            pass


def test_messages_say_what_happened_to_a_duplicated_member_and_a_vanished_shard(tmp_path, caplog):
    """Issue 22 case 8: a duplicated tar member was logged as an unreadable shard,
    "skipping the rest of it"; a shard deleted after the start was "unreadable (2)".
    Issue 18: the duplicate costs its sample (which copy is right is unknown), and only it."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(6):
            add(tar, f"s{i}.jpg", jpeg_bytes(i))
            add(tar, f"s{i}.txt", b"caption")
            if i == 2:
                add(tar, "s2.txt", b"a second caption for s2")
    write_tar(tmp_path / "00001.tar", [{"__key__": f"t{i}", "jpg": jpeg_bytes(i), "txt": "x"} for i in range(4)])
    Manifest([ShardInfo("00000.tar", 6), ShardInfo("00001.tar", 4)]).write(str(tmp_path))
    s = stream(str(tmp_path), workers=0, shuffle=0, max_skip_rate=1.0)
    (tmp_path / "00001.tar").unlink()  # gone after the start-up check
    with caplog.at_level("WARNING", logger="pipeline.data.loader"):
        keys = [k.split("#")[1] for batch in s for k in batch["keys"]]
    assert keys == ["s0", "s1", "s3", "s4", "s5"]  # every other sample of the shard with the duplicate
    messages = [r.getMessage() for r in caplog.records]
    assert any("s2.txt appears twice in its sample; the sample is skipped, the shard reads on" in m
               for m in messages), messages
    assert any(f"shard {tmp_path / '00001.tar'}: listed in the manifest but missing on disk" in m
               for m in messages), messages
    assert not any("skipping the rest" in m for m in messages), messages
    assert s.skipped() == Counter(unreadable_shard=4, duplicate_member=1)  # the vanished shard's 4 samples


def test_two_datasets_numbered_alike_keep_every_sample_with_its_own_caption(tmp_path):
    """Two datasets each numbered from 00000000 (img2dataset's keys), read back to back by
    one reader: webdataset's grouping over a stream of shards joined a shard's last sample
    with the next shard's first when their keys matched (a CI run lost one of the demo's
    1317 samples in epoch 1 and blamed a truncated shard). Each shard here ends on the key
    the other starts with, its last sample without a caption: joined, it would borrow the
    next shard's, whichever shard is read first."""
    for name, keys in (("a", ["00000000", "00000001"]), ("b", ["00000001", "00000000"])):
        (tmp_path / name).mkdir()
        write_tar(tmp_path / name / "00000.tar", [{"__key__": keys[0], "jpg": jpeg_bytes(0), "txt": f"{name} {keys[0]}"},
                                                  {"__key__": keys[1], "jpg": jpeg_bytes(1)}])
        Manifest([ShardInfo("00000.tar", 2)]).write(str(tmp_path / name))
    s = stream(f"{tmp_path / 'a'}::{tmp_path / 'b'}", readers=1, workers=0, shuffle=0, keep_captions=True,
               max_skip_rate=1.0)
    got = {key.split("/")[-2] + " " + key.split("#")[1]: caption
           for batch in s for key, caption in zip(batch["keys"], batch["captions"])}
    assert got == {"a 00000000": "a 00000000", "b 00000001": "b 00000001"}
    assert s.skipped() == Counter(missing_caption=2)


def test_half_the_samples_in_lost_shards_trip_the_skip_rate(tmp_path):
    """Issue 22 case 2: with half the manifest's samples in an unreadable shard the run
    reported a 1.96% skip rate (one bad "sample" per shard) and trained on."""
    write_tar(tmp_path / "00000.tar", [{"__key__": f"g{i:03d}", "jpg": jpeg_bytes(i), "txt": "x"} for i in range(200)])
    (tmp_path / "00001.tar").write_bytes(b"not a tar at all" * 64)
    Manifest([ShardInfo("00000.tar", 200), ShardInfo("00001.tar", 200)]).write(str(tmp_path))
    with pytest.raises(DataQualityError, match=r"skipped 200 of \d+ samples \(\d+.\d%\).*unreadable_shard=200; "
                                               r"shards that cost the most: .*00001.tar \(200\)\."):
        for _ in stream(str(tmp_path), workers=0, shuffle=0, max_skip_rate=0.1):
            pass


def useless_shards(directory: Path, kind: str) -> Path:
    """Two shards with a manifest from which no good sample can come."""
    for i in range(2):
        if kind == "unreadable":
            (directory / f"{i:05d}.tar").write_bytes(b"not a tar at all" * 64)
        else:
            write_tar(directory / f"{i:05d}.tar", [{"__key__": f"s{j}", "jpg": b"garbage", "txt": "x"} for j in range(20)])
    Manifest([ShardInfo(f"{i:05d}.tar", 20) for i in range(2)]).write(str(directory))
    return directory


def first_error_within(batches, seconds: float):
    """The exception iterating `batches` raises, or AssertionError if it is still going
    after `seconds` (the old behaviour: forever)."""
    import threading
    caught = []

    def drain():
        try:
            for _ in batches:
                pass
        except Exception as e:  # noqa: BLE001 (handed to the test)
            caught.append(e)
        else:
            caught.append(None)
    worker = threading.Thread(target=drain, daemon=True)
    worker.start()
    worker.join(seconds)
    assert caught, f"still no batch and no error after {seconds} s"
    return caught[0]


@pytest.mark.parametrize("kind,workers", [("unreadable", 0), ("unreadable", 2), ("undecodable", 0)])
def test_a_stream_that_yields_nothing_stops_within_the_stall_limit(tmp_path, kind, workers):
    """Issue 22 case 1: with every shard unreadable a resampled run made 0 steps in 300 s
    and never said why. Every shard unreadable now stops as soon as each has failed once
    (issue 32: nothing can come); shards that open but hold only bad samples stop at the
    stall limit."""
    useless_shards(tmp_path, kind)
    error = first_error_within(stream(str(tmp_path), workers=workers, resampled=True, max_skip_rate=1.0,
                                      stall_seconds=1.5), 60)
    assert isinstance(error, DataQualityError), error
    message = str(error)
    assert "\n" not in message and "(virtual reader 0, rank 0" in message and f"{tmp_path}/0000" in message, message
    if kind == "unreadable":
        assert "every one of the 2 shards failed before its first sample" in message, message
    else:
        assert "no good sample in" in message and "data.stall_seconds=1.5" in message
        assert "undecodable_image=" in message, message


def test_an_epoch_without_a_batch_is_an_error_but_a_finished_one_is_not(tmp_path, demo_data):
    """Issue 22 case 1: with data.resampled=false and nothing readable, the trainer ran
    empty epoch after empty epoch (18,114 log lines). An epoch that was already finished
    when the stream was resumed is empty too, and fine."""
    useless_shards(tmp_path, "unreadable")
    error = first_error_within(stream(str(tmp_path), workers=2, max_skip_rate=1.0), 60)
    assert isinstance(error, DataQualityError), error
    assert "epoch 0 gave rank 0 no batch of 16" in str(error) and "unreadable_shard=40" in str(error), error
    assert f"{tmp_path}/0000" in str(error)
    good = stream(str(demo_data / "shards" / "digits"), workers=2)
    assert sum(1 for _ in good) > 0
    assert list(good) == []  # the epoch is over: nothing more, and no error


def _summing_worker(rank: int, port: int, out: str):
    import torch.distributed as dist
    from pipeline.data.loader import shard_losses_over_ranks, summed_over_ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # bad samples on rank 1 only: rank 0 alone would see a clean stream
        local = Counter() if rank == 0 else Counter(undecodable_image=30, unreadable_shard=50)
        lost = Counter() if rank == 0 else Counter({"b.tar": 50, "a.tar": 30})
        good, truncated, skipped = summed_over_ranks(100 + rank, rank, local, "cpu")
        assert truncated == 1  # 0 + 1
        with pytest.raises(DataQualityError) as err:  # every rank names the shards, rank 0 too
            check_skip_rate(good, skipped, 0.1, lambda: shard_losses_over_ranks(lost))
        torch.save({"good": good, "skipped": dict(skipped), "error": str(err.value)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_skip_counters_are_summed_over_ranks_before_the_check(tmp_path):
    """Issue 22 case 3: `data_skipped/*` and the skip-rate check saw rank 0's counters
    only. Every rank now gets the sums, and every rank stops on them."""
    import torch.multiprocessing as mp
    from conftest import free_port
    out = tmp_path / "sums"
    mp.spawn(_summing_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["good"] == 201 and results[0]["skipped"] == {"undecodable_image": 30, "unreadable_shard": 50}
    assert "skipped 80 of 281 samples" in results[0]["error"]
    assert "shards that cost the most: b.tar (50), a.tar (30)." in results[0]["error"]


def test_missing_shards_fail_before_anything_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_shards: shard .*00006.tar does not exist"):
        resolve_shards(f"{tmp_path}/{{00006..00007}}.tar")
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        resolve_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no shards given"):
        resolve_shards("")


def test_batches_carry_what_objectives_ask_for(demo_data):
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0)
    s = DataStream(cfg, BatchRecipe(views=2), batch_size=4, image=ImageSpec(32, "imagenet"), context_length=16,
                   keep_captions=True)
    batch = next(iter(s))
    assert batch["images"].shape == batch["images_1"].shape == (4, 3, 32, 32)
    assert not torch.equal(batch["images"], batch["images_1"])  # two independent augmentations
    assert len(batch["captions"]) == 4 and batch["text"].shape == (4, 16)
    assert (batch["text"][:, 0] == 49406).all()


def test_slip_views_are_simclr_augmentations_of_the_same_image(demo_data):
    """ssl_0/ssl_1: two views with SimCLR's recipe (crops down to 8% of the image, colour
    jitter, grayscale, blur, flip) next to the CLIP view, reproducible for a seed."""
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0, shuffle_buffer=0, readers=1)

    def first_batch():
        s = DataStream(cfg, BatchRecipe(ssl_views=2), batch_size=16, image=ImageSpec(32, "clip"), context_length=16)
        return next(iter(s))
    batch, again = first_batch(), first_batch()
    assert batch["ssl_0"].shape == batch["ssl_1"].shape == batch["images"].shape == (16, 3, 32, 32)
    assert not torch.equal(batch["ssl_0"], batch["ssl_1"]) and not torch.equal(batch["ssl_0"], batch["images"])
    for key in ("images", "ssl_0", "ssl_1"):
        assert torch.equal(batch[key], again[key]), key
    # Grayscale with p 0.2 is part of the recipe: un-normalized, some views have R == G == B,
    # the plain CLIP views of these colour photographs never do.
    from pipeline.model.configs import NORMALIZATION
    mean, std = (torch.tensor(v)[None, :, None, None] for v in NORMALIZATION["clip"])

    def grayscale_count(x):
        rgb = x * std + mean
        return int(((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 1e-4).sum())
    views = torch.cat([batch["ssl_0"], batch["ssl_1"]])
    assert grayscale_count(batch["images"]) == 0 and 0 < grayscale_count(views) < len(views)


def test_declip_batches_carry_moco_views_an_eda_text_and_masked_tokens(demo_data):
    """What DeCLIP asks of the loader: two MoCo-augmented image views, an EDA view of each
    caption (tokenized as text_eda), and the caption's tokens MLM-masked with labels,
    all reproducible from the seed."""
    from pipeline.data.eda import eda, load_synonyms
    from pipeline.data.samples import sample_seed
    from pipeline.tokenizer import IGNORE_INDEX, MASK_ID
    from pipeline.tokenizer import tokenize
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0, shuffle_buffer=0, readers=1)

    def first_batch():
        s = DataStream(cfg, BatchRecipe(views=2, view_augment="moco", text_eda=True, mlm_probability=0.15),
                       batch_size=32, image=ImageSpec(32, "clip"), context_length=32, keep_captions=True)
        return next(iter(s))
    batch, again = first_batch(), first_batch()
    for key in ("images", "images_1", "text", "text_eda", "mlm_labels"):
        assert torch.equal(batch[key], again[key]), key
    assert not torch.equal(batch["images"], batch["images_1"])
    # MoCo v2's grayscale (p 0.2) reaches the contrastive views themselves
    from pipeline.model.configs import NORMALIZATION
    mean, std = (torch.tensor(v)[None, :, None, None] for v in NORMALIZATION["clip"])
    rgb = torch.cat([batch["images"], batch["images_1"]]) * std + mean
    assert ((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 1e-4).any()
    # text is the caption with MLM masking; the labels restore it exactly
    original = tokenize(batch["captions"], 32)
    selected = batch["mlm_labels"] != IGNORE_INDEX
    assert selected.any() and (batch["text"] == MASK_ID).any()
    assert torch.equal(torch.where(selected, batch["mlm_labels"], batch["text"]), original)
    # text_eda is the EDA view the sample's seed gives (seed 0, epoch 0, reader 0, the sample's raw position)
    synonyms = load_synonyms("wordnet")
    expected = [eda(c, random.Random(sample_seed(0, 0, 0, i + 1, -1)), synonyms)
                for i, c in enumerate(batch["captions"])]
    assert torch.equal(batch["text_eda"], tokenize(expected, 32))
    assert not torch.equal(batch["text_eda"], original)


def test_an_epoch_still_open_at_exit_does_not_hang_the_interpreter(demo_data):
    """Workers ignore SIGTERM (SLURM's is the trainer's to handle), and SIGTERM-then-join
    is how Python ends daemonic children at exit: an iterator held to the end (here a
    global; in a run, a traceback) hung the process forever."""
    child = f"""
from pipeline.config import DataConfig
from pipeline.data.loader import DataStream
from pipeline.data.recipe import ImageSpec
stream = DataStream(DataConfig(train_shards={str(demo_data / 'shards' / 'digits')!r}, workers=2, resampled=True),
                    batch_size=8, image=ImageSpec(32, "clip"), context_length=16)
batches = iter(stream)
next(batches)
print("exiting with the epoch open", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-2000:]


def test_a_slow_consumer_is_not_a_stalled_stream(tmp_path):
    """The stall clock must not run while the trainer is busy (a long evaluation, a
    checkpoint): a reader waiting to hand over its next batch is not stalled, even when
    the first sample it reads afterwards is bad."""
    import time
    write_tar(tmp_path / "00000.tar", [{"__key__": f"s{i:03d}", "jpg": b"garbage" if i % 4 == 0 else jpeg_bytes(i),
                                        "txt": "x"} for i in range(24)])
    Manifest([ShardInfo("00000.tar", 24)]).write(str(tmp_path))
    seen = 0
    # batches of 6 good samples: the first sample read after each batch (s8, s16) is bad
    for batch in stream(str(tmp_path), workers=0, shuffle=0, batch=6, max_skip_rate=1.0, stall_seconds=0.5):
        seen += len(batch["keys"])
        time.sleep(0.8)  # the trainer's step, longer than the stall limit
    assert seen == 18  # every good sample, no stall


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[16:29])  # width, height, bit depth, colour type, ...
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_images_declaring_too_many_pixels_are_skipped_before_decoding(tmp_path):
    """Issue 18: a few hundred bytes of PNG can declare gigabytes of pixels. Above
    data.max_image_pixels (40 MP) the sample is skipped as oversized_image from its header;
    above Pillow's own bomb limit too (it used to count as undecodable)."""
    from pipeline.data.decode import BadSample, decode_sample
    for width, height in ((8000, 8000), (20000, 20000)):
        with pytest.raises(BadSample) as bad:
            decode_sample({"png": png_declaring(width, height), "txt": b"x"}, max_pixels=40_000_000)
        assert bad.value.reason == "oversized_image"
    samples = [{"__key__": "bomb", "png": png_declaring(9000, 9000), "txt": "x"},
               *({"__key__": f"g{i}", "jpg": jpeg_bytes(i), "txt": "x"} for i in range(8))]
    write_tar(tmp_path / "00000.tar", samples)
    Manifest([ShardInfo("00000.tar", 9)]).write(str(tmp_path))
    s = stream(str(tmp_path), workers=0, shuffle=0, batch=4, max_skip_rate=1.0)
    assert sum(len(b["keys"]) for b in s) == 8 and s.skipped() == Counter(oversized_image=1)


# ---- a fuzzed corpus: nothing crashes, every bad sample is counted, memory stays bounded ----

def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def fuzzed_corpus(root: Path, big_member: int) -> tuple[set[str], Counter]:
    """Every kind of bad input of issue 18 among good samples: (the good keys, the skips
    expected by reason)."""
    root.mkdir()
    mixed = root / "00000.tar"
    good = [f"g{i:03d}" for i in range(30)]
    with tarfile.open(mixed, "w") as tar:
        for i, key in enumerate(good[:15]):
            add_member(tar, f"{key}.jpg", jpeg_bytes(i))
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
        add_member(tar, "bomb.png", png_declaring(20000, 20000))  # 1.2 GB of pixels if decoded
        add_member(tar, "bomb.txt", b"x")
        add_member(tar, "zero.jpg", b"")
        add_member(tar, "zero.txt", b"x")
        add_member(tar, "long.jpg", jpeg_bytes(1))  # a good sample, its caption cut
        add_member(tar, "long.txt", "ü".encode() * 500_000)  # 1 MB, the cut lands mid-character
        add_member(tar, "latin.jpg", jpeg_bytes(2))  # a good sample, not UTF-8
        add_member(tar, "latin.txt", "café crème".encode("latin-1"))
        add_member(tar, "dup.jpg", jpeg_bytes(3))
        add_member(tar, "dup.txt", b"one")
        add_member(tar, "dup.txt", b"two")
        add_member(tar, "../../escape.jpg", jpeg_bytes(4))
        add_member(tar, "../../escape.txt", b"x")
        add_member(tar, "/abs/olute.jpg", jpeg_bytes(5))
        add_member(tar, "/abs/olute.txt", b"x")
        add_member(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tar, "link.txt", b"x")
        add_member(tar, "fifo.jpg", kind=tarfile.FIFOTYPE)
        add_member(tar, "fifo.txt", b"x")
        add_member(tar, "big.jpg", bytes(big_member))  # over data.max_member_bytes: never read
        add_member(tar, "big.txt", b"x")
        add_member(tar, "somedir", kind=tarfile.DIRTYPE)  # structure, not a sample
        for i, key in enumerate(good[15:20], 15):
            add_member(tar, f"{key}.jpg", jpeg_bytes(i))
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
    with tarfile.open(root / "00001.tar", "w:gz") as tar:  # a gzip'd tar reads as a plain one
        for i, key in enumerate(good[20:], 20):
            add_member(tar, f"{key}.jpg", jpeg_bytes(i))
            add_member(tar, f"{key}.txt", f"caption {i}".encode())
    write_tar(root / "full.tar", [{"__key__": f"cut{i:03d}", "jpg": jpeg_bytes(i), "txt": "x"} for i in range(20)])
    with tarfile.open(root / "full.tar") as t:
        last = t.getmember("cut009.txt")
    data = (root / "full.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[:last.offset_data + -(-last.size // 512) * 512])  # cut after 10 samples
    (root / "full.tar").unlink()
    (root / "00003.tar").write_bytes(np.random.default_rng(0).bytes(50_000))  # random bytes
    with tarfile.open(root / "00004.tar", "w"):  # an empty tar
        pass
    Manifest([ShardInfo("00000.tar", 30), ShardInfo("00001.tar", 10), ShardInfo("00002.tar", 20),
              ShardInfo("00003.tar", 10), ShardInfo("00004.tar", 0)]).write(str(root))
    kept = [f"cut{i:03d}" for i in range(10)]
    good_keys = {f"{root / '00000.tar'}#{k}" for k in [*good[:20], "long", "latin"]} | \
                {f"{root / '00001.tar'}#{k}" for k in good[20:]} | {f"{root / '00002.tar'}#{k}" for k in kept}
    expected = Counter(oversized_image=1, empty_image=1, duplicate_member=1, unsafe_member=4, oversized_member=1,
                       truncated_shard=20 - len(kept), unreadable_shard=10)
    return good_keys, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fuzzed_corpus_trains_on_every_good_sample_once_and_counts_every_bad_one(tmp_path, workers):
    good_keys, expected = fuzzed_corpus(tmp_path / "shards", big_member=3 << 20)
    cfg = DataConfig(train_shards=str(tmp_path / "shards"), workers=workers, resampled=False, shuffle_buffer=20,
                     max_skip_rate=1.0, max_member_bytes=2 << 20)
    s = DataStream(cfg, batch_size=8, image=ImageSpec(32, "clip"), context_length=16, drop_last=False,
                   keep_captions=True)
    seen, captions = [], {}
    for batch in s:
        seen += batch["keys"]
        captions.update(zip(batch["keys"], batch["captions"]))
    assert len(seen) == len(set(seen)) and set(seen) == good_keys  # each good sample once, no bad one
    assert s.skipped() == expected, s.skipped()
    assert s.truncated() == 1
    long_caption = captions[f"{tmp_path / 'shards' / '00000.tar'}#long"]
    assert long_caption == "ü" * 2048  # 4096 bytes: the default data.max_caption_bytes, whole characters only
    assert captions[f"{tmp_path / 'shards' / '00000.tar'}#latin"] == "caf\ufffd cr\ufffdme"


MEASURE_RSS = """
import resource, sys
from pipeline.config import DataConfig
from pipeline.data.loader import DataStream
from pipeline.data.recipe import ImageSpec

def epoch(shards):
    cfg = DataConfig(train_shards=shards, workers=0, resampled=False, shuffle_buffer=0, max_skip_rate=1.0)
    return sum(len(b["keys"]) for b in DataStream(cfg, batch_size=8, image=ImageSpec(32, "clip"),
                                                   context_length=16, drop_last=False))

epoch(sys.argv[1])  # a clean epoch first: the tokenizer, PIL and torch's allocations are in place
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
epoch(sys.argv[2])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MB (ru_maxrss is in kB)
"""


def test_reading_the_fuzzed_corpus_takes_bounded_memory(tmp_path, demo_data):
    """The corpus holds a PNG declaring 20000 x 20000 pixels (1.2 GB once decoded), a 1 MB
    caption and a 96 MB member (over the default 64 MB data.max_member_bytes; webdataset
    read members whole): the reader's peak memory grows by less than the member alone
    would cost. Measured here: 0 MB; with the member limit lifted, 260 MB."""
    fuzzed_corpus(tmp_path / "shards", big_member=96 << 20)
    done = subprocess.run([sys.executable, "-c", MEASURE_RSS, f"{demo_data}/shards/photos",
                           str(tmp_path / "shards")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    grown_mb = int(done.stdout.split()[-1])
    print(f"peak RSS grew by {grown_mb} MB over the fuzzed epoch")
    assert grown_mb < 48, grown_mb


def steps_of(shards: str, world: int, workers: int, steps: int, *, resampled=True, global_batch=16, readers=4,
             states=None, start=0):
    """Per step: {key: image tensor} over every rank of a `world`-process run (each rank's
    stream on its own, as the trainer's ranks are), and every rank's position after."""
    out, ends = [dict() for _ in range(steps)], []
    for rank in range(world):
        s = stream(shards, rank=rank, world=world, workers=workers, resampled=resampled, batch=global_batch // world,
                   readers=readers, drop_last=True)
        if states is not None:
            s.load_state_dict({"from_ranks": states})
        batches = s.forever()
        for step in range(steps):
            batch = next(batches)
            out[step].update(zip(batch["keys"], batch["images"]))
            assert len(batch["keys"]) == global_batch // world
        ends.append(s.state_dict())
        batches.close()
    return out, ends


@pytest.mark.parametrize("resampled", [True, False])
def test_each_step_holds_the_same_samples_on_any_topology(demo_data, resampled):
    """The data order is a function of (seed, epoch, data.readers, global batch) only: one
    process, two, four, with or without loader workers, every step's global batch is the
    same samples with the same augmentations."""
    spec = str(demo_data / "shards" / "digits")
    reference, _ = steps_of(spec, 1, 0, 6, resampled=resampled)
    for world, workers in ((1, 2), (2, 1), (2, 2), (4, 1)):
        got, _ = steps_of(spec, world, workers, 6, resampled=resampled)
        for step, (want, have) in enumerate(zip(reference, got)):
            assert sorted(want) == sorted(have), f"world {world} x {workers} workers: step {step} holds other samples"
            assert all(torch.equal(want[k], have[k]) for k in want), f"world {world}: step {step}, other crops"
    # and the order is not degenerate: the steps differ, and a sample comes once per epoch
    keys = [k for step in reference for k in step]
    assert len(set(keys)) == len(keys) if not resampled else len(set(map(frozenset, reference))) == 6


def test_a_run_saved_on_two_processes_resumes_on_one_and_on_four(demo_data):
    """The position is per virtual reader: two ranks' states, joined, continue on one
    process (or four) with exactly the batches the two-process run would have made next."""
    spec = str(demo_data / "shards" / "digits")
    straight, _ = steps_of(spec, 2, 1, 7, resampled=False)
    _, states = steps_of(spec, 2, 1, 3, resampled=False)
    for world, workers in ((1, 2), (4, 1)):
        rest, _ = steps_of(spec, world, workers, 4, resampled=False, states=states)
        for step, (want, have) in enumerate(zip(straight[3:], rest)):
            assert sorted(want) == sorted(have), f"resumed on {world}: step {3 + step} differs"
            assert all(torch.equal(want[k], have[k]) for k in want)


def test_one_epoch_interrupted_and_resumed_on_another_world_size_reads_every_sample_once(demo_data):
    """Exactly once, across a change of topology: 2 processes (2 workers each) read part of
    a non-resampled epoch, 1 process reads the rest; every sample of the four shards
    (250 each: two readers of 500) comes once."""
    digits = demo_data / "shards" / "digits"
    spec = f"{digits}/{{00000..00003}}.tar"
    first, states = steps_of(spec, 2, 2, 20, resampled=False, readers=2, global_batch=20)
    s = stream(spec, world=1, workers=1, resampled=False, readers=2, batch=20, drop_last=True)
    s.load_state_dict({"from_ranks": states})
    seen = [k for step in first for k in step]
    for batch in s:
        seen += batch["keys"]
    assert len(seen) == len(set(seen)), "a sample came twice"
    expected = {k for k in all_keys(digits) if Path(k.split("#")[0]).stem in ("00000", "00001", "00002", "00003")}
    assert set(seen) == expected and len(expected) == 1000


def test_data_readers_must_suit_the_world_size_and_keep_across_a_resume(demo_data):
    spec = str(demo_data / "shards" / "digits")
    with pytest.raises(ValueError, match=r"data.readers=4 is not a multiple of the world size 3: it runs on 1, 2, 4"):
        stream(spec, world=3, readers=4, drop_last=True)
    with pytest.raises(ValueError, match=r"data.readers=8 virtual readers but 6 shards"):
        stream(spec, readers=8, drop_last=True)
    _, states = steps_of(spec, 2, 1, 1, resampled=False)
    s = stream(spec, world=1, readers=2, batch=16, drop_last=True)
    with pytest.raises(ValueError, match=r"made with data.readers=4, this run has 2"):
        s.load_state_dict({"from_ranks": states})
    s = stream(spec, world=1, readers=4, batch=32, drop_last=True)
    with pytest.raises(ValueError, match=r"made with train.global_batch_size=16, this run has 32"):
        s.load_state_dict({"from_ranks": states})
