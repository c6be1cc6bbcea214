"""Evaluation dataset readers. Each returns plain lists (image sources, labels or
captions) plus the metadata the task needs; bad or missing data is one line naming the
path and what is wrong.

Classification (zero-shot, linear probe):
* class folders: `ROOT/[SPLIT/]<class>/<image>`; class names from `ROOT/classnames.txt`
  (one per line, in label order) or else the folder names; numeric folder names are
  label indices. This is also what `python -m data_prep.demo` writes for its held-out set.
* CLIP_benchmark's webdataset layout: `ROOT/classnames.txt`,
  `ROOT/zeroshot_classification_templates.txt`, `ROOT/SPLIT/nshards.txt`,
  `ROOT/SPLIT/{0..n-1}.tar` with an image (webp/jpg/png) and a `.cls` label per sample.
Templates come from `ROOT/zeroshot_classification_templates.txt` (`{c}` is the class
name), else OpenAI's ImageNet templates from open_clip.

A remote ROOT (s3://, gs://, http(s)://, as CLIP_benchmark's sets are published) must be in
the webdataset layout: its split is copied into a local cache (MSCLIP_CACHE, default
~/.cache/msclip-pipeline) through the training reader's opener, with its timeouts and
retries (pipeline/data/remote.py), and read from there; fetched again when a file changed
on the store (its ETag, else its size and modification time, checked at each use), and
the least recently used splits removed beyond MSCLIP_CACHE_MAX_GB (default 200).

Retrieval:
* Karpathy splits: `ROOT/dataset_coco.json` or `ROOT/dataset_flickr30k.json` (images with
  `split`, `filepath`, `filename`, `sentences[].raw`), images under ROOT (COCO:
  `ROOT/<filepath>/<filename>`; Flickr30K: `ROOT/flickr30k-images/<filename>` or
  `ROOT/images/<filename>`).
* CLIP_benchmark's webdataset layout: samples with an image and a `.txt` of captions,
  one per line.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.config import DataConfig
from pipeline.data.decode import shard_samples
from pipeline.data.remote import is_remote, object_identity, open_url, opened, read_bytes, read_policy

# The training reader's limits (pipeline.config.DataConfig), as refusals: an evaluation
# set is curated, so a sample over a limit is an error naming it, not a silent skip that
# would change what the score measures.
LIMITS = DataConfig()

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_KEYS = ("webp", "jpg", "jpeg", "png")


class EvalDataError(ValueError):
    pass


class DatasetMissing(EvalDataError):
    """The dataset is not there at all (a suite lists it and goes on), as opposed to
    being there and broken."""


@dataclass
class ClassificationSet:
    name: str
    images: list  # file paths or encoded image bytes
    labels: list[int]
    classnames: list[str]
    templates: list[str]
    key: str = ""  # where it was read from (dataset_key): names its cached features


@dataclass
class RetrievalSet:
    name: str
    images: list  # file paths or encoded image bytes, one per image
    captions: list[list[str]]  # captions[i]: the captions of image i
    key: str = ""


def cache_root() -> Path:
    return Path(os.environ.get("MSCLIP_CACHE", Path.home() / ".cache" / "msclip-pipeline"))


def dataset_key(name: str, location: str | Path, split: str, count: int) -> str:
    """`<name>-<hash of the resolved location, split and sample count>`: a folder name for
    the features of one split of one dataset (eval/features.py FeatureCache)."""
    where = str(Path(location).resolve()) if not is_remote(str(location)) else str(location)
    return f"{name}-{hashlib.sha256(f'{where}#{split}#{count}'.encode()).hexdigest()[:12]}"


def _read_lines(path: Path) -> list[str]:
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise EvalDataError(f"{path}: empty")
    return lines


def read_templates(root: Path) -> list[str]:
    path = root / "zeroshot_classification_templates.txt"
    if path.is_file():
        templates = _read_lines(path)
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise EvalDataError(f"{path}: template {bad[0]!r} has no {{c}} placeholder for the class name")
        return templates
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def cache_bound() -> float:
    """Bytes the eval cache may hold (MSCLIP_CACHE_MAX_GB, default 200): CLIP_benchmark's
    suite copied whole is larger than many home folders."""
    value = os.environ.get("MSCLIP_CACHE_MAX_GB", "200")
    try:
        return float(value) * 1e9
    except ValueError:
        raise EvalDataError(f"MSCLIP_CACHE_MAX_GB={value!r}: not a number of GB") from None


def local_copy(root: str | Path, split: str) -> Path:
    """`root` itself when local; a remote webdataset-layout set's split copied into the
    cache. A copy is complete when its stamp is written; the stamp records each file's
    identity on the store (remote.object_identity), checked at each use: a set changed on
    the store is fetched again, and one whose store cannot be asked now (offline) is used
    as it is, with a line saying so. After a copy, the least recently used other copies are
    removed until the cache fits MSCLIP_CACHE_MAX_GB."""
    if not is_remote(str(root)):
        return Path(root)
    url = str(root).rstrip("/")
    cache = cache_root() / "eval"
    # the set's own name last: it names the dataset in MLflow
    local = cache / hashlib.sha256(url.encode()).hexdigest()[:12] / urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    stamp = local / split / ".complete"
    policy = read_policy(LIMITS)
    if stamp.is_file():
        if cached_copy_is_current(url, split, stamp, policy):
            stamp.touch()  # its last use, for the eviction order
            return local
        shutil.rmtree(local / split)
    try:
        nshards = read_bytes(f"{url}/{split}/nshards.txt", policy)
    except FileNotFoundError:
        raise DatasetMissing(f"{url}/{split}/nshards.txt: missing (a remote dataset must be in CLIP_benchmark's "
                             f"webdataset layout)") from None
    except OSError as e:
        raise EvalDataError(f"{url}/{split}/nshards.txt: cannot be read ({e})") from None
    (local / split).mkdir(parents=True, exist_ok=True)
    (local / split / "nshards.txt").write_bytes(nshards)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):  # optional (retrieval has neither)
        try:
            (local / name).write_bytes(read_bytes(f"{url}/{name}", policy))
        except FileNotFoundError:
            pass
    try:
        count = int(nshards.decode().strip())
    except ValueError:
        raise EvalDataError(f"{url}/{split}/nshards.txt: not a shard count") from None
    identities = {}
    for name in [f"{split}/nshards.txt", *(f"{split}/{i}.tar" for i in range(count))]:
        source = f"{url}/{name}"
        try:
            # before the copy: an object replaced during it is then found changed next time
            identities[name] = object_identity(source, policy)
            if name.endswith(".tar"):
                with open_url(source, policy) as f, open(local / name, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
        except OSError as e:
            raise EvalDataError(f"{source}: cannot be read ({e})") from None
    stamp.write_text(json.dumps({"url": url, "split": split, "identities": identities}))
    evict_least_recently_used(cache, keep=local / split)
    return local


def cached_copy_is_current(url: str, split: str, stamp: Path, policy) -> bool:
    """Whether every file the stamp records still has its identity on the store. A store
    that cannot be asked keeps the copy (an offline node evaluates what it has)."""
    try:
        recorded = json.loads(stamp.read_text() or "{}").get("identities", {})
    except json.JSONDecodeError:
        recorded = {}
    if not recorded:  # a stamp written before identities were recorded
        return True
    for name, identity in recorded.items():
        try:
            now = object_identity(f"{url}/{name}", policy)
        except FileNotFoundError:
            now = "gone"
        except OSError as e:
            copied = time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp.stat().st_mtime))
            print(f"[eval] {url}/{split}: the store cannot be asked whether it changed ({e}); the cached copy "
                  f"(last used {copied}) is used", file=sys.stderr, flush=True)
            return True
        if now != identity:
            print(f"[eval] {url}/{name} changed on the store since it was cached ({identity} -> {now}); "
                  f"{split} is fetched again", file=sys.stderr, flush=True)
            return False
    return True


def evict_least_recently_used(cache: Path, keep: Path):
    """Remove whole cached splits, least recently used first (a stamp's mtime is its last
    use), until the cache fits MSCLIP_CACHE_MAX_GB; never `keep`, the split just copied."""
    bound = cache_bound()
    splits = []
    for stamp in cache.glob("*/*/*/.complete"):
        folder = stamp.parent
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        splits.append((stamp.stat().st_mtime, folder, size))
    total = sum(size for _, _, size in splits)
    for _, folder, size in sorted(splits, key=lambda entry: entry[0]):
        if total <= bound:
            return
        if folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        print(f"[eval] cache: removed {folder} ({size / 1e9:.2f} GB, the least recently used) to stay under "
              f"MSCLIP_CACHE_MAX_GB={bound / 1e9:g}", file=sys.stderr, flush=True)
    if total > bound:
        print(f"[eval] cache: {keep} alone is {total / 1e9:.2f} GB, over MSCLIP_CACHE_MAX_GB={bound / 1e9:g}; kept "
              f"while it is in use", file=sys.stderr, flush=True)


def read_classification(root: str | Path, split: str = "test") -> ClassificationSet:
    root = local_copy(root, split)
    if not root.is_dir():
        raise DatasetMissing(f"{root}: no such dataset directory")
    if (root / split / "nshards.txt").is_file():
        return _read_wds_classification(root, split)
    base = root / split if (root / split).is_dir() else root
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if not folders:
        raise EvalDataError(f"{base}: no class folders (expected {base}/<class>/<image>) and no {split}/nshards.txt")
    if (root / "classnames.txt").is_file():
        classnames = _read_lines(root / "classnames.txt")
    else:
        classnames = [f.name for f in folders]
    if all(f.name.isdigit() for f in folders):
        index = {f: int(f.name) for f in folders}
    else:
        index = {f: i for i, f in enumerate(folders)}
    if max(index.values()) >= len(classnames):
        raise EvalDataError(f"{base}: class folder {max(index.values())} but {root / 'classnames.txt'} "
                            f"lists {len(classnames)} classes")
    images, labels = [], []
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(f)
                labels.append(index[folder])
    if not images:
        raise EvalDataError(f"{base}: class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ClassificationSet(root.name, images, labels, classnames, read_templates(root),
                             dataset_key(root.name, root, split, len(images)))


def _wds_samples(root: Path, split: str):
    nshards_file = root / split / "nshards.txt"
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise EvalDataError(f"{nshards_file}: not a shard count") from None
    urls = [str(root / split / f"{i}.tar") for i in range(nshards)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise EvalDataError(f"{missing[0]}: missing ({nshards_file} says {nshards} shards)")
    refused = []

    def refuse(url, member, reason):
        why = {"oversized_member": f"larger than data.max_member_bytes={LIMITS.max_member_bytes}",
               "unsafe_member": "not a regular file inside the shard (a link, a device, '..' or a leading '/')"}
        refused.append(f"{url}: member {member}: {why[reason]}")

    def reraise(exn):
        raise exn

    streams = opened(iter([dict(url=u) for u in urls]), read_policy(LIMITS), reraise)
    for sample in shard_samples(streams, LIMITS.max_member_bytes, refuse, reraise):
        if refused:
            raise EvalDataError(refused[0])
        key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
        if key is None:
            raise EvalDataError(f"{sample['__url__']}: sample {sample['__key__']} has no image")
        yield sample, sample[key]


def _read_wds_classification(root: Path, split: str) -> ClassificationSet:
    images, labels = [], []
    for sample, image in _wds_samples(root, split):
        if "cls" not in sample:
            raise EvalDataError(f"{sample['__url__']}: sample {sample['__key__']} has no .cls label")
        images.append(image)
        labels.append(int(sample["cls"].decode().strip()))
    classnames = _read_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else None
    if classnames is None:
        raise EvalDataError(f"{root / 'classnames.txt'}: missing")
    return ClassificationSet(root.name, images, labels, classnames, read_templates(root),
                             dataset_key(root.name, root, split, len(images)))


def cut_caption(text: str) -> str:
    """A caption cut at data.max_caption_bytes (UTF-8, whole characters), as the training
    reader cuts: the tokenizer keeps 77 tokens anyway, and a 1 MB caption cost seconds."""
    raw = text.encode()
    return raw[:LIMITS.max_caption_bytes].decode(errors="ignore") if len(raw) > LIMITS.max_caption_bytes else text


def read_retrieval(root: str | Path, split: str = "test") -> RetrievalSet:
    root = local_copy(root, split)
    if (root / split / "nshards.txt").is_file():
        images, captions = [], []
        for sample, image in _wds_samples(root, split):
            if "txt" not in sample:
                raise EvalDataError(f"{sample['__url__']}: sample {sample['__key__']} has no .txt captions")
            images.append(image)
            captions.append([cut_caption(c) for c in sample["txt"].decode(errors="replace").splitlines() if c.strip()])
        return RetrievalSet(root.name, images, captions, dataset_key(root.name, root, split, len(images)))
    karpathy = root if root.suffix == ".json" else next(
        (root / n for n in ("dataset_coco.json", "dataset_flickr30k.json") if (root / n).is_file()), None)
    if not root.exists():
        raise DatasetMissing(f"{root}: no such dataset directory or file")
    if karpathy is None or not karpathy.is_file():
        raise EvalDataError(f"{root}: neither a Karpathy split json (dataset_coco.json / dataset_flickr30k.json) "
                            f"nor {split}/nshards.txt")
    base = karpathy.parent
    try:
        entries = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] == split]
    except (ValueError, KeyError, TypeError) as e:
        raise EvalDataError(f"{karpathy}: not a Karpathy split file ({type(e).__name__}: {e})") from None
    images, captions = [], []
    for e in entries:
        candidates = [base / e.get("filepath", "") / e["filename"], base / "flickr30k-images" / e["filename"],
                      base / "images" / e["filename"]]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise EvalDataError(f"{candidates[0]}: image listed in {karpathy.name} is missing")
        images.append(path)
        captions.append([cut_caption(s["raw"]) for s in e["sentences"]])
    if not images:
        raise EvalDataError(f"{karpathy}: no images in split {split!r}")
    name = karpathy.stem.replace("dataset_", "")
    return RetrievalSet(name, images, captions, dataset_key(name, karpathy, split, len(images)))


class ImageDataset(Dataset):
    """Images (paths or encoded bytes) through the model's eval transform."""

    def __init__(self, images: list, transform, targets: list | None = None):
        self.images, self.transform, self.targets = images, transform, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        src = self.images[i]
        name = src if not isinstance(src, bytes) else f"image {i}"
        try:
            image = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)  # the header only
        except Image.DecompressionBombError as e:
            raise EvalDataError(f"{name}: {e}") from None
        except Exception as e:
            raise EvalDataError(f"{name}: cannot decode ({e})") from None
        if image.size[0] * image.size[1] > LIMITS.max_image_pixels:  # before decoding: a crafted header
            raise EvalDataError(f"{name}: declares {image.size[0]} x {image.size[1]} pixels, over "
                                f"data.max_image_pixels={LIMITS.max_image_pixels}")
        try:
            image = image.convert("RGB")
        except Exception as e:
            raise EvalDataError(f"{name}: cannot decode ({e})") from None
        x = self.transform(image)
        return (x, self.targets[i]) if self.targets is not None else x


def image_loader(images: list, transform, batch_size: int, workers: int, targets: list | None = None) -> DataLoader:
    return DataLoader(ImageDataset(images, transform, targets), batch_size=batch_size, num_workers=workers,
                      shuffle=False, pin_memory=torch.cuda.is_available())
