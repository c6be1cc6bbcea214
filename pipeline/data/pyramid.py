"""PyramidCLIP's input pyramid from what the shards carry (PyramidCLIP, Gao et al., NeurIPS
2022, arXiv 2204.14095, sec. 3.1).

Text levels, from the sample's `.json` (img2dataset's extra parquet columns):
* `summary`: a summarizer's caption. PyramidCLIP runs an offline summarizer; when the
  column is absent or empty the built-in fallback is the caption's first sentence cut to
  SUMMARY_WORDS words (a cheap extractive summary: web captions put the subject first).
* `tags`: comma-separated tags (YFCC user tags: data_prep.yfcc keeps them). When absent
  or empty the fallback is the caption's words that are not stop words, in order, as
  "a, b, c" (the objects a tagger would name).

Region features: `roi.npy` in the sample (np.save of a float32 array (R, D), D = the
model's `roi_dim`, 2052 in PyramidCLIP: 2048 detector features + 4 box coordinates),
padded or cut to `max_rois` (PyramidCLIP keeps 10) with a mask of the real ones.
"""
from __future__ import annotations

import io
import json
import re

import numpy as np
import torch

from pipeline.data.eda import STOP_WORDS

SUMMARY_WORDS = 8
_SENTENCE_END = re.compile(r"[.!?;]\s")


def metadata(sample: dict) -> dict:
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def summary_text(caption: str, meta: dict) -> str:
    given = str(meta.get("summary") or "").strip()
    if given:
        return given
    first = _SENTENCE_END.split(caption + " ", maxsplit=1)[0]
    return " ".join(first.split()[:SUMMARY_WORDS])


def tags_text(caption: str, meta: dict) -> str:
    given = [t.strip() for t in str(meta.get("tags") or "").split(",") if t.strip()]
    if given:
        return ", ".join(given)
    words = [w.strip(".,!?;:\"'()") for w in caption.split()]
    return ", ".join(w for w in words if w and w.lower() not in STOP_WORDS) or caption


def read_rois(sample: dict, max_rois: int, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(max_rois, dim) features and (max_rois,) mask, or None when the sample has none or
    they do not have the expected shape."""
    raw = sample.get("roi.npy")
    if not raw:
        return None
    try:
        rois = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError):
        return None
    if rois.ndim != 2 or rois.shape[1] != dim or rois.shape[0] == 0:
        return None
    rois = torch.from_numpy(np.ascontiguousarray(rois[:max_rois], dtype=np.float32))
    features = torch.zeros(max_rois, dim)
    features[:len(rois)] = rois
    mask = torch.zeros(max_rois, dtype=torch.bool)
    mask[:len(rois)] = True
    return features, mask
