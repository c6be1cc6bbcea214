"""YFCC100M metadata -> url/caption parquet (`key, url, caption, tags`).

    python -m data_prep.yfcc --input yfcc100m_dataset.bz2 --output yfcc.parquet [--ids yfcc15m_ids.txt]

Reads the tab-separated YFCC100M dataset file as a stream (plain, .bz2 or .gz; the real
file has 100M lines and is never loaded whole). Both published layouts are understood,
told apart by their column count:

* Yahoo Webscope (2014), 23 columns: photo id, user NSID, nickname, date taken, date
  uploaded, capture device, title, description, user tags, machine tags, longitude,
  latitude, accuracy, page URL, download URL, licence name, licence URL, server id,
  farm id, secret, original secret, original extension, photo/video marker.
* AWS multimedia-commons `yfcc100m_dataset.bz2`, 25 columns: a line number and, after
  the photo id, the photo hash; then the same columns.

Rules, in order (each drop is counted by reason and printed at the end): keep photos
(marker 0) with a download URL; optionally keep only ids listed in --ids (the published
YFCC15M / YFCC-22M subsets are id lists); URL-decode title, description and tags;
strip HTML; collapse whitespace; drop camera-default titles (IMG_1234, DSC01234,
P1010001.JPG, ...); caption = "title. description"; drop captions shorter than
--min-chars. User tags are kept (comma-separated) as the `tags` column: PyramidCLIP's
tag level reads them.
"""
from __future__ import annotations

import bz2
import gzip
import io
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
from tqdm import tqdm

from data_prep.common import ParquetRowWriter, clean_text
from pipeline.cli import command_line

_COMMON = ["user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device", "title", "description",
           "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url", "download_url",
           "license_name", "license_url", "server_id", "farm_id", "secret", "secret_original",
           "extension_original", "marker"]
LAYOUTS = {
    23: ["photo_id", *_COMMON],  # Webscope 2014
    25: ["line_number", "photo_id", "photo_hash", *_COMMON],  # AWS multimedia-commons
}
OUTPUT_COLUMNS = ["key", "url", "caption", "tags"]

# Titles that cameras and phones write by default: an optional device prefix, digits,
# an optional image extension ("IMG_1234", "DSC01234", "P1010001.JPG", "100_0042").
CAMERA_DEFAULT_TITLE = re.compile(
    r"^(img|dsc|dscn|dscf|dsci|dcp|dcim|pict|p|sam|gopr|gp|dji|cimg|mvi|imag|pxl|wp|photo|image|pic|scan)?"
    r"[\s_-]*\d+([\s_.-]*\d+)*(\.(jpe?g|png|tiff?|gif|bmp|heic|raw|cr2|nef|orf|arw))?$",
    re.IGNORECASE)
BARE_FILENAME = re.compile(r"^\S+\.(jpe?g|png|tiff?|gif|bmp|heic|raw|cr2|nef|orf|arw)$", re.IGNORECASE)


def open_text(path: str):
    """A text stream over a plain, .bz2 or .gz file, or '-' for stdin."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    if not Path(path).is_file():
        raise SystemExit(f"error: --input {path}: no such file")
    opener = bz2.open if path.endswith(".bz2") else gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="\n")


def load_ids(path: str) -> np.ndarray:
    """Sorted unique photo ids from a file whose lines start with an id (tab, comma or
    space separated; a header or any non-numeric first field is skipped)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: --ids {path}: no such file")
    ids = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            first = re.split(r"[\t, ]", line.strip(), maxsplit=1)[0]
            if first.isdigit():
                ids.append(int(first))
    if not ids:
        raise SystemExit(f"error: --ids {path}: no photo ids found (expected one id per line)")
    return np.unique(np.asarray(ids, dtype=np.int64))


def is_camera_default(title: str) -> bool:
    return bool(CAMERA_DEFAULT_TITLE.match(title) or BARE_FILENAME.match(title))


def make_caption(title: str, description: str) -> str:
    title = clean_text(unquote_plus(title))
    if is_camera_default(title):
        title = ""
    description = clean_text(unquote_plus(description))
    if title and description:
        return f"{title}{'' if title[-1] in '.!?' else '.'} {description}"
    return title or description


def decode_tags(raw: str) -> str:
    tags = (clean_text(unquote_plus(t)) for t in raw.split(","))
    return ", ".join(t for t in tags if t)


def convert(input_path: str, output_path: str, ids_path: str | None = None, min_chars: int = 5,
            limit: int | None = None) -> Counter:
    """Stream the dump into the parquet; returns counts of kept rows and of drops by reason."""
    keep_ids = load_ids(ids_path) if ids_path else None
    stats: Counter = Counter()
    layout = None
    with open_text(input_path) as f, ParquetRowWriter(output_path, OUTPUT_COLUMNS) as out:
        for line in tqdm(f, desc="yfcc lines", unit=" lines", unit_scale=True, mininterval=2):
            if limit is not None and stats["lines"] >= limit:
                break
            stats["lines"] += 1
            fields = line.rstrip("\n").split("\t")
            if layout is None:
                if len(fields) not in LAYOUTS:
                    raise SystemExit(f"error: --input {input_path}: line 1 has {len(fields)} tab-separated columns; "
                                     f"a YFCC100M dataset file has 23 (Webscope) or 25 (AWS)")
                layout = {name: i for i, name in enumerate(LAYOUTS[len(fields)])}
            if len(fields) != len(layout):
                stats["dropped_malformed_line"] += 1
                continue
            if fields[layout["marker"]] != "0":
                stats["dropped_video"] += 1
                continue
            url = fields[layout["download_url"]].strip()
            if not url:
                stats["dropped_no_url"] += 1
                continue
            photo_id = fields[layout["photo_id"]]
            if keep_ids is not None:
                pid = int(photo_id) if photo_id.isdigit() else -1
                i = np.searchsorted(keep_ids, pid)
                if i == len(keep_ids) or keep_ids[i] != pid:
                    stats["dropped_not_in_ids"] += 1
                    continue
            caption = make_caption(fields[layout["title"]], fields[layout["description"]])
            if len(caption) < min_chars:
                stats["dropped_short_caption"] += 1
                continue
            out.write(key=photo_id, url=url, caption=caption, tags=decode_tags(fields[layout["user_tags"]]))
            stats["kept"] += 1
    return stats


def main(argv=None):
    parser = command_line("python -m data_prep.yfcc", __doc__)
    parser.add_argument("--input", required=True, help="yfcc100m_dataset file (.bz2/.gz/plain) or - for stdin")
    parser.add_argument("--output", required=True, help="parquet to write (key, url, caption, tags)")
    parser.add_argument("--ids", help="keep only these photo ids (one per line), e.g. the YFCC15M list")
    parser.add_argument("--min-chars", type=int, default=5, help="drop captions shorter than this (default 5)")
    parser.add_argument("--limit", type=int, help="read at most this many lines (for trials)")
    args = parser.parse_args(argv)
    stats = convert(args.input, args.output, args.ids, args.min_chars, args.limit)
    print(" ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
