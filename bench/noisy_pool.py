"""A noisy pool planted in the demo's digit shards, for the curation tests and bench: the
captions of some pairs swapped between samples of different digits (a pair whose caption
names the wrong digit), and near-duplicate copies of some images (re-encoded, shifted by a
pixel, under a new key, with the same caption). Says which samples are which."""
from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class Planted:
    swapped: set[str] = field(default_factory=set)  # uids whose caption names another digit
    copies: dict[str, str] = field(default_factory=dict)  # copy's uid -> its original's uid
    clean: set[str] = field(default_factory=set)  # uids of untouched samples that have no copy


def read_samples(tar_path: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
    return list(samples.values())


def near_copy(jpeg: bytes, rng: random.Random) -> bytes:
    """The same picture as a crawler meets it twice: shifted by a pixel, re-encoded."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    dx, dy = rng.choice([(1, 0), (0, 1), (1, 1)])
    image = image.crop((dx, dy, w, h)).resize((w, h), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.choice([80, 85, 90]))
    return out.getvalue()


def plant_noise(source: Path, output: Path, swap_fraction: float = 0.2, copy_fraction: float = 0.1,
                seed: int = 0, shards: int | None = None) -> Planted:
    """`source`'s shards (one folder of img2dataset tars) rewritten into `output` with the
    noise planted, with their manifest; `shards`: only the first ones."""
    from data_prep.curate import sample_uid
    from pipeline.data.manifest import Manifest, ShardInfo
    rng = random.Random(seed)
    output.mkdir(parents=True, exist_ok=True)
    by_shard = {path.name: read_samples(path) for path in sorted(source.glob("*.tar"))[:shards]}
    everyone = [(name, s) for name, samples in by_shard.items() for s in samples]
    label = {id(s): json.loads(s["json"])["tags"].split(",")[0] for _, s in everyone}
    uid = {id(s): sample_uid(str(output / name), s["__key__"]) for name, s in everyone}
    planted = Planted()
    order = list(everyone)
    rng.shuffle(order)
    chosen = order[:int(swap_fraction * len(order))]
    # partners of different digits: a swap within a digit would not be noise
    pending = list(chosen)
    while len(pending) >= 2:
        _, a = pending.pop()
        j = next((i for i, (_, b) in enumerate(pending) if label[id(b)] != label[id(a)]), None)
        if j is None:
            break
        _, b = pending.pop(j)
        a["txt"], b["txt"] = b["txt"], a["txt"]
        planted.swapped |= {uid[id(a)], uid[id(b)]}
    untouched = [(name, s) for name, s in order if uid[id(s)] not in planted.swapped]
    originals = untouched[:int(copy_fraction * len(order))]
    for name, s in originals:
        copy = {**s, "__key__": f"c{s['__key__']}", "jpg": near_copy(s["jpg"], rng)}
        by_shard[name].append(copy)
        planted.copies[sample_uid(str(output / name), copy["__key__"])] = uid[id(s)]
    with_copies = set(planted.copies.values())
    planted.clean = {uid[id(s)] for _, s in untouched} - with_copies
    for name, samples in by_shard.items():
        with tarfile.open(output / name, "w") as tar:
            for s in samples:
                for extension in ("jpg", "txt", "json"):
                    info = tarfile.TarInfo(f"{s['__key__']}.{extension}")
                    info.size = len(s[extension])
                    tar.addfile(info, io.BytesIO(s[extension]))
    Manifest([ShardInfo(name, len(samples)) for name, samples in by_shard.items()], source="noisy pool").write(
        str(output))
    return planted
