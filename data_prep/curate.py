"""Curation: from a noisy pool of shards to a training set (DataComp's CLIP-score filter,
SemDeDup's semantic de-duplication, resharding the survivors).

    python -m data_prep.curate embed --shards SPEC --checkpoint model.pt --output emb/
        [--format ours|msclip|openai|open_clip --model NAME --source S] [--batch-size 256]
        [--workers 2] [--device auto]
    python -m data_prep.curate filter --embeddings emb/ --output kept.parquet
        [--min-score S | --top-fraction F] [--min-caption-words N] [--min-side PX]
        [--dedup-threshold 0.95 [--dedup-hash-bits 6]] [--clusters K] [--memory-gb 4]
    python -m data_prep.curate reshard --shards SPEC --kept kept.parquet --output shards/curated
        [--samples-per-shard 10000]

**embed** scores every sample of a shard set (local, s3://, http(s)://, `a::b` specs, as the
trainer reads them) with any model the project loads: its image and caption embeddings
(fp16, L2-normalized), the pair's CLIP score (their cosine) and the image's 64-bit
perceptual hash. One parquet per shard,
written atomically, so a killed run resumes shard by shard; under torchrun each process
takes every WORLD_SIZE-th shard (RANK), on its GPU when there is one (bf16 autocast).
Samples that cannot be decoded are counted by reason (pipeline/data/decode.py), not
embedded.

**filter** reads the per-shard files out of core (DuckDB over the parquet for the rules,
the embeddings a shard file at a time), applies the rules in order and counts every drop
by its first failed rule: a caption of fewer than --min-caption-words words, an image
whose short side is under --min-side, a CLIP score under --min-score or outside the
--top-fraction best (DataComp's CLIP-score filter: 30% of the pool with an L/14 made
DataComp-1B), then near-duplicates: the image embeddings are clustered with k-means
(scikit-learn's MiniBatchKMeans, fitted on a sample) and within a cluster, of two images
whose cosine exceeds --dedup-threshold the one with the higher CLIP score stays
(SemDeDup, Abbas et al. 2023, de-duplicates within k-means clusters the same way; it
keeps the point farthest from the centroid instead); with --dedup-hash-bits a pair must
also be the same picture, its perceptual hashes within that many bits (what tells a
re-encoded copy from another picture a model sees alike). Clusters are processed in buckets
that fit --memory-gb. Writes the kept samples (uid, shard, key, score) and prints the
summary table, also written beside the output as JSON.

**reshard** reads the original shards again and writes the kept samples, every member
as it was (image, caption, metadata json) under its original key, into new shards of
--samples-per-shard with a manifest: a shard set the trainer reads as any other.

A sample's uid is `<shard folder>/<shard file>/<key>`: it survives a copy of the shards to
another store and tells apart two sources numbered alike (`digits::photos`).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cli import command_line
from pipeline.redact import redact

EMBED_CONFIG = "embed.json"


class CurateError(ValueError):
    """Bad input to a curation step: the message is one line naming the file or option."""


def sample_uid(shard_url: str, key: str) -> str:
    path = PurePosixPath(urlsplit(shard_url).path if "://" in shard_url else shard_url)
    return redact(f"{path.parent.name}/{path.name}/{key}")  # a pipe: command's words could hold a secret


def raw_shard_samples(url: str, policy, counts: Counter):
    """One shard's raw webdataset samples (dicts of member bytes by extension), read as the
    trainer reads them; a shard that breaks off is counted and ends its samples."""
    from pipeline.data.decode import shard_samples
    from pipeline.data.remote import opened

    def broken(exn) -> bool:
        counts["unreadable_shard"] += 1
        print(f"[curate] shard {url}: {exn.args[0] if exn.args else type(exn).__name__}; the rest of it is skipped",
              file=sys.stderr, flush=True)
        return True

    def refused(_url, _member, reason):
        counts[reason] += 1

    yield from shard_samples(opened(iter([{"url": url}]), policy, broken), 0, refused, broken)


# ---- embed ----------------------------------------------------------------------------


class _ShardBatches:
    """The batches of a list of shards, a shard at a time (a loader worker takes every
    num_workers-th shard): (shard index, uids, keys, captions, sizes, image tensor, last)."""

    def __init__(self, shards: list[tuple[int, str]], transform, batch_size: int, policy):
        self.shards, self.transform, self.batch_size, self.policy = shards, transform, batch_size, policy

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from pipeline.data.decode import BadSample, decode_sample
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for index, url in mine:
            counts: Counter = Counter()
            rows: list[tuple] = []
            for sample in raw_shard_samples(url, self.policy, counts):
                try:
                    image, caption = decode_sample(sample)
                except BadSample as bad:
                    counts[bad.reason] += 1
                    continue
                rows.append((sample_uid(url, sample["__key__"]), sample["__key__"], caption, image.size,
                             perceptual_hash(image), self.transform(image)))
                if len(rows) == self.batch_size:
                    yield index, rows, None
                    rows = []
            yield index, rows, dict(counts)  # the shard's last batch (maybe empty) carries its skips

    @staticmethod
    def collate(item):
        import torch
        index, rows, skipped = item
        images = torch.stack([r[5] for r in rows]) if rows else None
        return index, [r[:5] for r in rows], images, skipped


def embed(shards_spec: str, checkpoint: str, output: str, fmt: str = "ours", model_name: str | None = None,
          source: str | None = None, batch_size: int = 256, workers: int = 2, device: str = "auto") -> Counter:
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from pipeline.data.remote import read_policy
    from pipeline.data.shards import resolve_shards
    from pipeline.data.transforms import eval_transform
    from pipeline.config import DataConfig
    from pipeline.tokenizer import tokenize
    from pipeline.weights.load import load_checkpoint

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    policy = read_policy(DataConfig())
    shards = resolve_shards(shards_spec, "--shards", policy)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model, payload = load_checkpoint(checkpoint, fmt, model_name, source)
    model = model.to(device).eval()
    name = payload.get("model_name") or model_name or "?"
    # what is written names the shards without their credentials (a signed URL, a userinfo)
    described = redact({"shards": shards_spec, "checkpoint": str(checkpoint), "format": fmt, "model": name,
                        "embed_dim": int(model.arch.embed_dim), "shard_urls": shards.urls})
    check_embed_config(out, described, rank)
    todo = [(i, url) for i, url in enumerate(shards.urls) if i % world == rank and not shard_output(out, i).exists()]
    print(f"[curate] embed: {len(shards.urls)} shards, {len(todo)} to do on rank {rank} of {world} "
          f"({name} on {device})", flush=True)
    transform = eval_transform(model.arch.image_size, model.arch.normalization)

    class Batches(IterableDataset):
        def __iter__(self):
            return iter(_ShardBatches(todo, transform, batch_size, policy))

    loader = DataLoader(Batches(), batch_size=None, num_workers=min(workers, len(todo)),
                        collate_fn=_ShardBatches.collate)
    pending: dict[int, list] = defaultdict(list)
    counts: Counter = Counter()
    started, embedded = time.perf_counter(), 0
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu",
                                                                                                      enabled=False)
    with torch.no_grad(), autocast:
        for index, rows, images, skipped in loader:
            if rows:
                image_emb = model.encode_image(images.to(device), normalize=True).float()
                tokens = tokenize([r[2] for r in rows], model.arch.context_length).to(device)
                text_emb = model.encode_text(tokens, normalize=True).float()
                scores = (image_emb * text_emb).sum(-1)
                pending[index].append((rows, image_emb.half().cpu().numpy(), text_emb.half().cpu().numpy(),
                                       scores.cpu().numpy()))
                embedded += len(rows)
            if skipped is not None:  # the shard is complete
                counts.update(skipped)
                write_shard(out, index, redact(shards.urls[index]), pending.pop(index, []))
                counts["shards"] += 1
    seconds = time.perf_counter() - started
    counts["embedded"] = embedded
    print(f"[curate] embed: {embedded} samples of {counts['shards']} shards in {seconds:.1f} s, "
          f"{embedded / max(seconds, 1e-9):.0f} samples/s on rank {rank} ({device}); skipped: "
          f"{', '.join(f'{k}={v}' for k, v in sorted(counts.items()) if k not in ('embedded', 'shards')) or 'none'}",
          flush=True)
    return counts


def perceptual_hash(image) -> int:
    """The image's 64-bit perceptual hash (pHash as the imagehash library defines it: the
    32 x 32 grey image's 2-D DCT, its 8 x 8 lowest frequencies against their median): the
    same picture shifted, rescaled or re-encoded lies a few bits away, another picture
    about half of them."""
    from PIL import Image
    from scipy.fft import dctn
    grey = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), np.float32)
    low = dctn(grey, norm="ortho")[:8, :8].reshape(-1)
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def shard_output(out: Path, index: int) -> Path:
    return out / f"{index:06d}.parquet"


def check_embed_config(out: Path, described: dict, rank: int):
    """A folder holds the embeddings of one model over one shard list: a resumed run must
    be the same one (its per-shard files would otherwise mix two models' scores)."""
    path = out / EMBED_CONFIG
    if path.is_file():
        recorded = json.loads(path.read_text())
        for key in ("shard_urls", "checkpoint", "format", "model"):
            if recorded.get(key) != described[key]:
                raise CurateError(f"--output {out}: holds the embeddings of another {key.replace('_', ' ')} "
                                  f"({recorded.get(key)!r}); give this run another folder")
        return
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(described, indent=1))
        os.replace(tmp, path)


def write_shard(out: Path, index: int, url: str, parts: list):
    rows = [r for part in parts for r in part[0]]
    dim = parts[0][1].shape[1] if parts else 0

    def vectors(arrays):
        flat = np.concatenate(arrays).reshape(-1) if arrays else np.zeros(0, np.float16)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim) if dim else \
            pa.array([], pa.list_(pa.float16()))

    table = pa.table({
        "uid": pa.array([r[0] for r in rows], pa.string()), "key": pa.array([r[1] for r in rows], pa.string()),
        "shard": pa.array([url] * len(rows), pa.string()), "caption": pa.array([r[2] for r in rows], pa.string()),
        "width": pa.array([r[3][0] for r in rows], pa.int32()), "height": pa.array([r[3][1] for r in rows], pa.int32()),
        "phash": pa.array(np.array([r[4] for r in rows], np.uint64).view(np.int64), pa.int64()),
        "score": pa.array(np.concatenate([p[3] for p in parts]) if parts else [], pa.float32()),
        "image_emb": vectors([p[1] for p in parts]), "text_emb": vectors([p[2] for p in parts])})
    path = shard_output(out, index)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a shard's file exists whole or not at all: the resume skips it


# ---- filter ---------------------------------------------------------------------------

REASONS = ("dropped_short_caption", "dropped_small_image", "dropped_low_score", "dropped_near_duplicate")


def filter_pool(embeddings: str, output: str, min_score: float | None = None, top_fraction: float | None = None,
                min_caption_words: int = 0, min_side: int = 0, dedup_threshold: float = 0.0,
                clusters: int = 0, memory_gb: float = 4.0, seed: int = 0, dedup_hash_bits: int | None = None) -> dict:
    folder = Path(embeddings)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise CurateError(f"--embeddings {folder}: no per-shard parquet (run `python -m data_prep.curate embed`)")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise CurateError(f"--top-fraction {top_fraction}: must be in (0, 1]")
    if dedup_hash_bits is not None:
        if not 0 <= dedup_hash_bits <= 64:
            raise CurateError(f"--dedup-hash-bits {dedup_hash_bits}: must be in [0, 64]")
        unhashed = next((f for f in files if "phash" not in pq.read_schema(f).names), None)
        if unhashed is not None:
            raise CurateError(f"--dedup-hash-bits: {unhashed} has no perceptual hashes (written by an earlier "
                              f"embed); embed the pool again into a new folder")
    con = duckdb.connect()
    pool = f"read_parquet({[str(f) for f in files]!r})"
    rules = []
    if min_caption_words:
        rules.append((f"len(string_split(trim(caption), ' ')) < {int(min_caption_words)}", "dropped_short_caption"))
    if min_side:
        rules.append((f"least(width, height) < {int(min_side)}", "dropped_small_image"))
    if min_score is not None:
        rules.append((f"score < {float(min_score)!r}", "dropped_low_score"))
    if top_fraction is not None and top_fraction < 1:
        # the threshold over the samples the other rules keep: DataComp's top 30% is of the pool it filters
        passing = " AND ".join(f"NOT ({cond})" for cond, _ in rules) or "true"
        threshold = con.execute(f"SELECT quantile_disc(score, {1 - top_fraction!r}) FROM {pool} "
                                f"WHERE {passing}").fetchall()[0][0]
        if threshold is not None:
            rules.append((f"score < {float(threshold)!r}", "dropped_low_score"))
    reason = ("CASE " + " ".join(f"WHEN {cond} THEN '{why}'" for cond, why in rules) + " END") if rules else "NULL"
    verdicts = con.sql(f"SELECT uid, {reason} AS reason FROM {pool}").to_arrow_table()
    con.close()
    pooled = verdicts.num_rows
    summary = Counter(r for r in verdicts.column("reason").to_pylist() if r)
    survivors = set(verdicts.filter(pc.is_null(verdicts.column("reason"))).column("uid").to_pylist())
    if dedup_threshold:
        duplicates = near_duplicates(files, survivors, dedup_threshold, clusters, memory_gb, seed, dedup_hash_bits)
        summary["dropped_near_duplicate"] = len(duplicates)
        survivors -= duplicates
    kept = write_kept(files, survivors, Path(output))
    table = {"pool": pooled, **{r: summary.get(r, 0) for r in REASONS}, "kept": kept}
    Path(output).with_suffix(".summary.json").write_text(json.dumps(table, indent=1))
    width = max(map(len, table))
    print("\n".join(f"{name:<{width}}  {count:>10}  {count / max(pooled, 1):7.2%}" for name, count in table.items()))
    return table


def read_vectors(path: Path, uids: set[str], column: str = "image_emb",
                 hashes: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """One shard file's rows among `uids`: their uids, embeddings (float32), scores and,
    with `hashes`, perceptual hashes (uint64)."""
    table = pq.read_table(path, columns=["uid", "score", column, *(["phash"] if hashes else [])])
    mask = pa.array([u in uids for u in table.column("uid").to_pylist()], pa.bool_())
    table = table.filter(mask)
    values = table.column(column).combine_chunks()
    dim = values.type.list_size if table.num_rows else 0
    vectors = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(table.num_rows, dim)
    phash = table.column("phash").to_numpy().view(np.uint64) if hashes else None
    return table.column("uid").to_pylist(), vectors, table.column("score").to_numpy(), phash


def near_duplicates(files: list[Path], survivors: set[str], threshold: float, clusters: int, memory_gb: float,
                    seed: int, hash_bits: int | None = None) -> set[str]:
    """The uids to drop as near-duplicates of a better-scored sample in their k-means cluster
    (with `hash_bits`, also within that many bits of its perceptual hash)."""
    from sklearn.cluster import MiniBatchKMeans
    n = len(survivors)
    if n < 2:
        return set()
    clusters = clusters or max(1, min(n // 2, round(math.sqrt(n))))  # ~sqrt(n) clusters of ~sqrt(n) points
    rng = np.random.default_rng(seed)
    # fitted on a sample: at most 256 points per cluster, spread over every file
    share = min(1.0, 256 * clusters / n)
    sample = []
    for path in files:
        _, vectors, _, _ = read_vectors(path, survivors)
        if len(vectors):
            sample.append(vectors[rng.random(len(vectors)) < share] if share < 1 else vectors)
    fit_on = np.concatenate(sample)
    kmeans = MiniBatchKMeans(n_clusters=min(clusters, len(fit_on)), random_state=seed, n_init=3,
                             batch_size=4096).fit(fit_on)
    # the members of a bucket of clusters fit in memory at once (4 bytes a dimension)
    dim = fit_on.shape[1]
    buckets = max(1, math.ceil(n * dim * 4 / (memory_gb * 1e9)))
    dropped: set[str] = set()
    for bucket in range(buckets):
        members: dict[int, list] = defaultdict(list)
        for path in files:
            uids, vectors, scores, phash = read_vectors(path, survivors, hashes=hash_bits is not None)
            if not uids:
                continue
            assigned = kmeans.predict(vectors)
            for i in np.flatnonzero(assigned % buckets == bucket):
                members[int(assigned[i])].append((uids[i], vectors[i], scores[i],
                                                  None if phash is None else phash[i]))
        for rows in members.values():
            dropped |= duplicates_in_cluster(rows, threshold, hash_bits)
    return dropped


def duplicates_in_cluster(rows: list[tuple], threshold: float, hash_bits: int | None = None) -> set[str]:
    """Greedy in order of CLIP score (then uid): a sample whose cosine with one already kept
    exceeds `threshold` (and, with `hash_bits`, whose perceptual hash is within that many
    bits of its) is a duplicate of it. rows: (uid, embedding, score[, perceptual hash]).

    Why both with hash_bits: the embedding alone cannot tell a near-copy from another
    picture of the same thing that a model sees alike (on the demo's digits, a clean
    sample's nearest cosine reaches 0.99 while a copy's can fall to 0.96), nor can the hash
    alone on small, similar pictures; a pair that is both the same picture and the same
    meaning is a copy (bench/curation.py measures what each finds)."""
    rows = sorted(rows, key=lambda r: (-float(r[2]), r[0]))
    vectors = np.stack([r[1] for r in rows])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # fp16 storage rounds the norm
    similar = vectors @ vectors.T > threshold
    if hash_bits is not None:
        phash = np.array([r[3] for r in rows], np.uint64)
        similar &= np.bitwise_count(phash[:, None] ^ phash[None, :]) <= hash_bits
    kept = np.zeros(len(rows), bool)
    dropped = set()
    for i in range(len(rows)):
        if similar[i, :i][kept[:i]].any():
            dropped.add(rows[i][0])
        else:
            kept[i] = True
    return dropped


def write_kept(files: list[Path], survivors: set[str], output: Path) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    schema = pa.schema([("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("score", pa.float32())])
    kept = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for path in files:
            table = pq.read_table(path, columns=["uid", "shard", "key", "score"])
            mask = pa.array([u in survivors for u in table.column("uid").to_pylist()], pa.bool_())
            table = table.filter(mask)
            kept += table.num_rows
            writer.write_table(table.cast(schema))
    os.replace(tmp, output)
    return kept


# ---- reshard --------------------------------------------------------------------------


def reshard(shards_spec: str, kept: str, output: str, samples_per_shard: int = 10_000) -> dict:
    """The kept samples of `shards_spec`, every member as it was, into new shards with a manifest."""
    from pipeline.config import DataConfig
    from pipeline.data.manifest import Manifest, ShardInfo
    from pipeline.data.remote import read_policy
    from pipeline.data.shards import resolve_shards
    if samples_per_shard < 1:
        raise CurateError(f"--samples-per-shard {samples_per_shard}: must be >= 1")
    policy = read_policy(DataConfig())
    shards = resolve_shards(shards_spec, "--shards", policy)
    if not Path(kept).is_file():
        raise CurateError(f"--kept {kept}: no such file (run `python -m data_prep.curate filter`)")
    wanted = set(pq.read_table(kept, columns=["uid"]).column("uid").to_pylist())
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written: list[ShardInfo] = []
    counts: Counter = Counter()
    writer = None

    def close():
        name, tar, tmp, count = writer
        tar.close()
        os.replace(tmp, out / name)  # a shard exists whole or not at all
        written.append(ShardInfo(name, count))

    for url in shards.urls:
        for sample in raw_shard_samples(url, policy, counts):
            if sample_uid(url, sample["__key__"]) not in wanted:
                counts["dropped"] += 1
                continue
            if writer is None or writer[3] == samples_per_shard:
                if writer is not None:
                    close()
                name = f"{len(written):05d}.tar"
                writer = [name, tarfile.open(out / f"{name}.tmp", "w"), out / f"{name}.tmp", 0]  # noqa: SIM115 (closed by close())
            for extension, data in sample.items():
                if extension.startswith("__") or extension == "url" or not isinstance(data, bytes):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                writer[1].addfile(info, io.BytesIO(data))
            writer[3] += 1
            counts["kept"] += 1
    if writer is not None:
        close()
    if not written:
        raise CurateError(f"--kept {kept}: none of its samples is in --shards {shards_spec}")
    Manifest(shards=written, source=f"curated from {shards_spec} by {kept}").write(str(out))
    missing = len(wanted) - counts["kept"]
    print(f"[curate] reshard: {counts['kept']} samples into {len(written)} shards in {out}; {counts['dropped']} "
          f"left out; {missing} kept samples not found in the shards", flush=True)
    return {**counts, "shards": len(written), "missing": missing}


def main(argv=None) -> int:
    parser = command_line("python -m data_prep.curate", __doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    e = steps.add_parser("embed", help="image/caption embeddings and CLIP scores, one parquet per shard")
    e.add_argument("--shards", required=True, help="a shard spec as data.train_shards takes it")
    e.add_argument("--checkpoint", required=True, help="model.pt, a run's checkpoints/, or released weights")
    e.add_argument("--format", choices=("ours", "msclip", "openai", "open_clip"), default="ours")
    e.add_argument("--model", help="with --format: the model to build")
    e.add_argument("--source", help="with --format openai/open_clip: the open_clip model name")
    e.add_argument("--output", required=True, help="a folder: one parquet per shard, and embed.json")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=2, help="decoding processes")
    e.add_argument("--device", default="auto", help="auto: this rank's GPU when there is one, else cpu")
    f = steps.add_parser("filter", help="rules, CLIP-score threshold, semantic de-duplication")
    f.add_argument("--embeddings", required=True, help="embed's output folder")
    f.add_argument("--output", required=True, help="the kept samples' parquet (uid, shard, key, score)")
    f.add_argument("--min-score", type=float, help="drop pairs whose CLIP score is lower")
    f.add_argument("--top-fraction", type=float, help="keep this fraction of best-scored pairs (DataComp: 0.3)")
    f.add_argument("--min-caption-words", type=int, default=0)
    f.add_argument("--min-side", type=int, default=0, help="drop images whose short side is smaller (pixels)")
    f.add_argument("--dedup-threshold", type=float, default=0.0, help="cosine above which two images are "
                                                                         "near-duplicates (0: no de-duplication)")
    f.add_argument("--dedup-hash-bits", type=int, help="near-duplicates must also lie within this many bits of "
                                                        "each other's 64-bit perceptual hash (e.g. 6; default: "
                                                        "the cosine alone)")
    f.add_argument("--clusters", type=int, default=0, help="k-means clusters (0: ~sqrt of the pool)")
    f.add_argument("--memory-gb", type=float, default=4.0, help="embeddings held at once while de-duplicating")
    f.add_argument("--seed", type=int, default=0)
    r = steps.add_parser("reshard", help="the kept samples into new shards with a manifest")
    r.add_argument("--shards", required=True, help="the shard spec embed read")
    r.add_argument("--kept", required=True, help="filter's output")
    r.add_argument("--output", required=True, help="a local folder for the new shards")
    r.add_argument("--samples-per-shard", type=int, default=10_000)
    args = parser.parse_args(argv)
    try:
        if args.step == "embed":
            embed(args.shards, args.checkpoint, args.output, args.format, args.model, args.source, args.batch_size,
                  args.workers, args.device)
        elif args.step == "filter":
            filter_pool(args.embeddings, args.output, args.min_score, args.top_fraction, args.min_caption_words,
                        args.min_side, args.dedup_threshold, args.clusters, args.memory_gb, args.seed,
                        args.dedup_hash_bits)
        else:
            reshard(args.shards, args.kept, args.output, args.samples_per_shard)
    except (CurateError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError:  # weights-only loading refused it (or it is no torch file)
        print(f"error: --checkpoint {args.checkpoint}: refusing to load: not a weights-only file", file=sys.stderr)
        return 2
    except duckdb.Error as e:  # a per-shard file that is not parquet: DuckDB names it
        print(f"error: --embeddings: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
