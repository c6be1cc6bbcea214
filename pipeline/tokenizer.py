"""CLIP byte-level BPE tokenizer.

Follows OpenAI CLIP's `simple_tokenizer.py` as open_clip ships it
(`open_clip/tokenizer.py`, clean='lower'): ftfy + double html.unescape, whitespace
collapse, lower-casing, the same pre-tokenization regex and the same merges file.
Its ids are identical to `open_clip.tokenize` (tests/test_tokenizer.py checks
this on >10k captions); it is faster because

* a whole pre-token maps to its id tuple in one dict lookup (open_clip caches the
  BPE string and then splits and looks up every piece again),
* a new pre-token's merges run in the Rust BPE model of Hugging Face `tokenizers`,
  loaded with CLIP's vocabulary and merges (as transformers' CLIPTokenizerFast does).
  It merges the lowest-ranked pair one occurrence at a time, leftmost first; CLIP
  merges every occurrence of that pair in one pass. Both give the same result because
  a merge never creates a pair ranked before it (every merge's tokens are made by
  earlier merges), so the occurrences are still the lowest-ranked pairs in turn. This
  is what a fresh loader worker spends its time on (bench_tokenizer's cold cache), and
* captions made only of printable ASCII without '&' skip ftfy, which provably
  leaves such text unchanged (see `_ASCII_NOTHING_TO_FIX`; a property test
  checks it against ftfy itself).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from typing import Iterable

import ftfy
import numpy as np
import regex as re
import torch
from tokenizers.models import BPE

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
# CLIP's vocabulary ends with SOT and EOT (tests/test_tokenizer.py checks them against the
# encoder); DeCLIP appends its mask token after them (id 49408, one more embedding row).
SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49408
# The label of a token that is not predicted (MLM): PyTorch cross-entropy's ignore_index.
IGNORE_INDEX = -100
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

# ftfy only rewrites control characters, HTML entities (it unescapes '&...;'),
# line breaks other than '\n', and non-ASCII text. A string drawn only from these
# characters therefore comes back from ftfy.fix_text unchanged.
_ASCII_NOTHING_TO_FIX = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")

# Bound the word cache so a long-running loader worker cannot grow without limit
# on a stream of unique junk tokens; real caption vocabularies fit easily.
_MAX_CACHE_ENTRIES = 1_000_000


def default_merges_path() -> str:
    """The standard CLIP merges file, as shipped inside the open_clip_torch package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "open_clip_torch is not installed, so the CLIP merges file "
            "bpe_simple_vocab_16e6.txt.gz cannot be found; pass merges_path explicitly")
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (CLIP's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clean_caption(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, html.unescape twice, collapse whitespace, lower-case."""
    if _ASCII_NOTHING_TO_FIX.fullmatch(text) is None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    def __init__(self, merges_path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        merges_path = merges_path or default_merges_path()
        if not os.path.exists(merges_path):
            raise FileNotFoundError(f"merges file not found: {merges_path}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(merges_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        # The first line is a version header; CLIP keeps 49152 - 256 - 2 merges.
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != VOCAB_SIZE:
            raise ValueError(f"merges file {merges_path} gives a vocabulary of {len(vocab)}, expected {VOCAB_SIZE}")
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe = BPE(vocab=self.encoder, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                       fuse_unk=False)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.pat = re.compile(
            rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            re.IGNORECASE,
        )
        self._word_ids: dict[str, tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}

    def _ids_of_word(self, word: str) -> tuple[int, ...]:
        ids = self._word_ids.get(word)
        if ids is None:
            encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(token.id for token in self.bpe.tokenize(encoded))
            if len(self._word_ids) >= _MAX_CACHE_ENTRIES:
                self._word_ids.clear()
            self._word_ids[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without SOT/EOT."""
        ids: list[int] = []
        for word in self.pat.findall(clean_caption(text)):
            ids.extend(self._ids_of_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """(N, context_length) ids: SOT, tokens, EOT, zero padding; overlong captions are
        truncated so that EOT is still the last token (EOT pooling depends on it)."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)][: context_length - 1]
            ids.append(self.eot_token_id)
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)


@lru_cache(maxsize=None)
def get_tokenizer(merges_path: str | None = None) -> ClipTokenizer:
    return ClipTokenizer(merges_path)


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """Tokenize with the standard merges file; ids identical to `open_clip.tokenize`."""
    return get_tokenizer()(texts, context_length)
