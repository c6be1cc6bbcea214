"""python -m data_prep.curate on a noisy pool planted in the demo's digit shards (bench/noisy_pool.py):
scored by the session's model trained on the clean shards, filtered by CLIP score and the
other rules, resharded, and read back by the trainer's stream. How much of the planted noise
the filter finds depends on the scoring model: bench/curation.py measures it."""
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from data_prep.curate import CurateError, embed, filter_pool, main
from bench.noisy_pool import read_samples


def test_near_duplicates_leave_one_kept_per_group_the_best_scored():
    """The greedy within a cluster: no two kept samples are closer than the threshold, and
    every dropped one has a kept one above the threshold that scores at least as well."""
    import numpy as np

    from data_prep.curate import duplicates_in_cluster
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    noisy = np.concatenate([base, base[:15] + 0.01 * rng.normal(size=(15, 16)).astype(np.float32)])
    rows = [(f"u{i}", noisy[i], float(rng.random())) for i in range(len(noisy))]
    dropped = duplicates_in_cluster(rows, 0.99)
    unit = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    cos = unit @ unit.T
    kept = [i for i in range(len(rows)) if rows[i][0] not in dropped]
    assert len(dropped) == 15  # one of each planted pair (the random base vectors lie far apart)
    assert all(cos[i, j] <= 0.99 for i in kept for j in kept if i != j)
    for i in (i for i in range(len(rows)) if rows[i][0] in dropped):
        assert any(cos[i, j] > 0.99 and rows[j][2] >= rows[i][2] for j in kept)


def test_a_near_copy_keeps_its_perceptual_hash_and_only_same_picture_pairs_are_duplicates(noisy):
    """The perceptual hash (pHash): a planted near-copy (shifted a pixel, rescaled,
    re-encoded) lies a few bits from its original (9 in 10 within 8), other pictures of
    the set 12 or more. With --dedup-hash-bits a pair needs both: the greedy against a naive loop over
    every pair, on embeddings where half the close pairs are different pictures."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from bench.noisy_pool import near_copy
    from data_prep.curate import duplicates_in_cluster, perceptual_hash
    shards, _ = noisy
    jpegs = [s["jpg"] for s in read_samples(sorted(shards.glob("*.tar"))[0])[:40]]
    rng = random.Random(0)
    hashes = [perceptual_hash(Image.open(io.BytesIO(j))) for j in jpegs]
    copies = [perceptual_hash(Image.open(io.BytesIO(near_copy(j, rng)))) for j in jpegs]
    copy_bits = [bin(a ^ b).count("1") for a, b in zip(hashes, copies)]
    other_bits = [bin(a ^ b).count("1") for a, b in zip(hashes, hashes[1:] + hashes[:1])]
    assert np.median(copy_bits) <= 4 and np.percentile(copy_bits, 90) <= 8 and min(other_bits) >= 12, \
        (copy_bits, other_bits)

    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    close = vectors + 0.001  # every second row's twin is the same picture, the others another one
    rows = [(f"u{i}", v, float(i % 7), hashes[i]) for i, v in enumerate(vectors)]
    rows += [(f"t{i}", close[i], float(i % 5), copies[i] if i % 2 == 0 else hashes[i + 20])
             for i in range(20)]
    dropped = duplicates_in_cluster(rows, 0.99, hash_bits=8)
    ordered = sorted(rows, key=lambda r: (-r[2], r[0]))
    unit = lambda v: v / np.linalg.norm(v)
    naive, kept = set(), []
    for r in ordered:
        if any(unit(r[1]) @ unit(k[1]) > 0.99 and bin(int(r[3]) ^ int(k[3])).count("1") <= 8 for k in kept):
            naive.add(r[0])
        else:
            kept.append(r)
    same_picture = sum(copy_bits[i] <= 8 for i in range(0, 20, 2))  # the twins within the hash bound
    assert dropped == naive and len(dropped) == same_picture >= 8  # one of each, none of the other pictures


def test_embed_resumes_shard_by_shard_and_refuses_another_model_in_its_folder(noisy, embedded, trained_model,
                                                                             tmp_path):
    shards, _ = noisy
    files = sorted(embedded.glob("*.parquet"))
    assert len(files) == len(list(shards.glob("*.tar")))  # the two ranks' halves make the whole
    assert json.loads((embedded / "embed.json").read_text())["model"] == "msclip-s-tiny"
    redo = tmp_path / "emb"
    redo.mkdir()
    for path in files[1:]:  # a run killed after its first shard: the others are done
        (redo / path.name).write_bytes(path.read_bytes())
    (redo / "embed.json").write_bytes((embedded / "embed.json").read_bytes())
    counts = embed(str(shards), str(trained_model), str(redo), batch_size=128, workers=0)
    assert counts["shards"] == 1
    assert pq.read_table(redo / files[0].name).equals(pq.read_table(files[0]))  # the same scores again
    other = json.loads((redo / "embed.json").read_text()) | {"checkpoint": "another.pt"}
    (redo / "embed.json").write_text(json.dumps(other))
    with pytest.raises(CurateError, match=r"--output .*emb: holds the embeddings of another checkpoint"):
        embed(str(shards), str(trained_model), str(redo), workers=0)


def test_a_score_is_the_cosine_of_the_pair_and_each_drop_is_counted_under_its_first_rule(embedded, tmp_path):
    import numpy as np
    pool = pq.read_table(sorted(embedded.glob("*.parquet")), columns=["caption", "score", "image_emb", "text_emb"])
    image = np.stack(pool.column("image_emb").to_numpy(zero_copy_only=False)).astype(np.float32)
    text = np.stack(pool.column("text_emb").to_numpy(zero_copy_only=False)).astype(np.float32)
    scores = pool.column("score").to_numpy()
    assert np.allclose((image * text).sum(1), scores, atol=2e-3)  # the stored fp16 vectors' cosine
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)
    median = float(np.median(scores))
    short = np.array([len(c.split()) < 3 for c in pool.column("caption").to_pylist()])
    summary = filter_pool(str(embedded), str(tmp_path / "k.parquet"), min_score=median, min_caption_words=3)
    assert summary["dropped_short_caption"] == short.sum()
    assert summary["dropped_low_score"] == ((scores < median) & ~short).sum()
    assert summary["kept"] == ((scores >= median) & ~short).sum()
    summary = filter_pool(str(embedded), str(tmp_path / "k.parquet"), min_caption_words=3, min_side=65)
    assert summary["dropped_small_image"] == (~short).sum() and summary["kept"] == 0  # the demo's 64 px images


def test_the_kept_samples_are_resharded_whole_and_read_by_the_trainers_stream(noisy, curated):
    from pipeline.config import DataConfig
    from pipeline.data.loader import DataStream
    from pipeline.data.recipe import ImageSpec
    shards, _ = noisy
    kept_path, out, result = curated
    kept = pq.read_table(kept_path)
    assert result["kept"] == kept.num_rows and result["missing"] == 0
    assert result["shards"] == -(-kept.num_rows // 200)
    # every member as it was, under its original key
    originals = {(tar.name, s["__key__"]): s for tar in shards.glob("*.tar") for s in read_samples(tar)}
    by_uid = dict(zip(kept.column("uid").to_pylist(), kept.column("shard").to_pylist()))
    written = [s for tar in sorted(out.glob("*.tar")) for s in read_samples(tar)]
    assert len(written) == kept.num_rows
    for sample in written[:50]:
        uid = next(u for u in by_uid if u.endswith(f"/{sample['__key__']}"))
        original = originals[(uid.split("/")[1], sample["__key__"])]
        assert sample == original
    stream = DataStream(DataConfig(train_shards=str(out), workers=0, shuffle_buffer=0, resampled=False, readers=1),
                        batch_size=50, image=ImageSpec(64, "clip"), context_length=32)
    assert sum(len(batch["keys"]) for batch in stream) == kept.num_rows - kept.num_rows % 50


def test_bad_input_is_one_line(demo_data, tmp_path, capsys):
    assert main(["filter", "--embeddings", str(tmp_path), "--output", str(tmp_path / "k.parquet")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --embeddings {tmp_path}: no per-shard parquet (run "
                                               f"`python -m data_prep.curate embed`)")
    assert main(["reshard", "--shards", str(tmp_path), "--kept", str(tmp_path / "none.parquet"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "000000.parquet").write_text("not parquet")
    assert main(["filter", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "k.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --embeddings: ") and "000000.parquet" in err and "\n" not in err
    (tmp_path / "bad.pt").write_text("not weights")
    assert main(["embed", "--shards", str(demo_data / "shards" / "digits"), "--checkpoint", str(tmp_path / "bad.pt"),
                 "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --checkpoint {tmp_path / 'bad.pt'}: refusing to load: not a " \
                                              f"weights-only file"
