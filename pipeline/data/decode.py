"""One raw webdataset sample -> (RGB image, caption), or the reason it is skipped.

Every reason a sample can be lost is named in `SKIP_REASONS` and counted by the stream
(pipeline/data/loader.py); nothing here is fatal. `tar_members` refuses what a tar could
make a reader do blindly (read a member of any size, follow a link, climb out of the
shard) before anything is read.
"""
from __future__ import annotations

import contextlib
import io
import math
import tarfile
from pathlib import PurePosixPath

import webdataset as wds
from PIL import Image

SKIP_REASONS = ("unreadable_shard", "truncated_shard", "missing_image", "empty_image", "undecodable_image",
                "oversized_image", "missing_caption", "empty_caption", "missing_roi", "oversized_member",
                "unsafe_member", "duplicate_member")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_sample(sample: dict, draft_size: int = 0, max_pixels: int = 0,
                  max_caption_bytes: int = 0) -> tuple[Image.Image, str]:
    """Raw webdataset sample -> (RGB image, caption), or BadSample(reason).

    max_caption_bytes > 0: the caption's bytes are cut there before decoding (a character
    split by the cut is dropped).

    max_pixels > 0: an image whose header declares more pixels is skipped as
    oversized_image before anything is decoded (a few hundred bytes of PNG can declare
    gigabytes of pixels); above twice Pillow's own limit Image.open refuses it first.

    draft_size > 0: JPEGs whose short side is at least twice that are decoded at a reduced
    scale (libjpeg's DCT scaling, 1/2 .. 1/8, PIL's `draft`) that keeps the short side >=
    draft_size: most of the decode is skipped when the shards are much larger than what
    the transform keeps."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample("missing_image")
    data = sample[key]
    if not data:
        raise BadSample("empty_image")
    if "txt" not in sample:
        raise BadSample("missing_caption")
    raw_caption = sample["txt"][:max_caption_bytes] if max_caption_bytes else sample["txt"]
    caption = raw_caption.decode("utf-8", errors="replace")
    if len(raw_caption) < len(sample["txt"]):
        caption = caption.rstrip("\ufffd")  # the cut's half character
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if max_pixels and image.size[0] * image.size[1] > max_pixels:
            raise BadSample("oversized_image")
        if draft_size and image.format == "JPEG" and min(image.size) >= 2 * draft_size:
            scale = min(image.size) / draft_size
            image.draft("RGB", (math.ceil(image.size[0] / scale), math.ceil(image.size[1] / scale)))
        image = image.convert("RGB")  # forces a full decode: truncated files fail here
    except BadSample:
        raise
    except Image.DecompressionBombError:
        raise BadSample("oversized_image") from None
    except Exception:  # PIL raises many types for corrupt data
        raise BadSample("undecodable_image") from None
    return image, caption


def tar_members(sources, max_member_bytes: int, reject, handler):
    """webdataset's tar_file_expander, with what it would read blindly refused first: a
    member larger than `max_member_bytes` (0: no limit) is never read (webdataset reads a
    member whole into memory), and a member that is not a regular file (a link, a device)
    or whose name climbs out of the shard ("../", an absolute path) is not read either;
    both are reported as `reject(url, member name, "oversized_member" | "unsafe_member")`
    and yielded empty, so that their sample still arrives to be counted. Directories are
    structure, not data. Gzip'd tars read as plain ones (mode r|*). A shard that fails
    goes to `handler(exception)` with its url last in the exception's args (webdataset's
    convention); False stops."""
    for source in sources:
        url = source["url"]
        try:
            tar = tarfile.open(fileobj=source["stream"], mode="r|*")
            for info in tar:
                tar.members = []  # a stream: keep no TarInfo of what was read
                name = info.name
                if info.isdir() or name.startswith("__"):  # webdataset's own metadata members
                    continue
                unsafe = not info.isreg() or name.startswith("/") or ".." in PurePosixPath(name).parts
                if unsafe or (max_member_bytes and info.size > max_member_bytes):
                    reject(url, name, "unsafe_member" if unsafe else "oversized_member")
                    data = b""
                else:
                    data = tar.extractfile(info).read()
                yield {"fname": name, "data": data, "__url__": url, "url": url}
        except Exception as exn:  # noqa: BLE001 (what webdataset's expander hands its handler)
            exn.args = (*exn.args, url)
            if not handler(exn):
                break
        finally:
            with contextlib.suppress(Exception):
                source["stream"].close()


def shard_samples(sources, max_member_bytes: int, reject, handler):
    """Samples, shard by shard: `tar_members` grouped into samples by webdataset's
    group_by_keys over one shard at a time. Over a stream of several shards it starts a
    new sample only when the key changes, not the shard: two datasets each numbered from
    00000000 (`a::b`), read back to back by one reader, had a shard's last sample and the
    next shard's first one joined when their keys matched; the second one's members were
    refused as duplicates and the sample lost, counted as a truncated shard, and where the
    two had different members, an image was paired with another sample's caption. A
    handler that returns True reads on (the next shard after a broken one); one that
    raises stops."""
    for source in sources:
        members = tar_members([source], max_member_bytes, reject, handler)
        yield from wds.tariterators.group_by_keys(members, handler=handler)
