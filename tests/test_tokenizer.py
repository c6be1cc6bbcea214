"""Our tokenizer against open_clip's (the reference CLIP tokenizer), id for id."""
import html
import random
import string

import ftfy
import open_clip
import pytest
import torch

from bench.captions import EDGE_CASES, varied_captions
from pipeline import tokenizer as tk



def test_ids_identical_to_open_clip_on_10k_varied_captions():
    captions = varied_captions(10_500)
    ours = tk.tokenize(captions)
    ref = open_clip.tokenize(captions)
    assert ours.dtype == ref.dtype == torch.long and ours.shape == ref.shape == (len(captions), 77)
    mismatched = [captions[i] for i in range(len(captions)) if not torch.equal(ours[i], ref[i])]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"


@pytest.mark.parametrize("context_length", [8, 32, 77])
def test_edge_cases_identical_at_other_context_lengths(context_length):
    assert torch.equal(tk.tokenize(EDGE_CASES, context_length), open_clip.tokenize(EDGE_CASES, context_length))


def test_truncation_keeps_eot_last_and_sot_first():
    ids = tk.tokenize(["a very long caption " * 40, "short"], context_length=16)
    tok = tk.get_tokenizer()
    assert (ids[:, 0] == tok.sot_token_id).all()
    assert ids[0, -1] == tok.eot_token_id and (ids[0] != 0).all()
    assert ids[1].argmax() == (ids[1] != 0).sum() - 1  # EOT is the largest id, at the end of the text


def test_vocabulary_and_special_ids():
    tok = tk.get_tokenizer()
    assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407
    assert tok.decode(tok.encode("a photo of a dog")).strip() == "a photo of a dog"


def test_ascii_fast_path_is_exactly_what_ftfy_and_unescape_do():
    """The fast path skips ftfy for strings of its safe alphabet; ftfy must leave those unchanged."""
    rng = random.Random(1)
    alphabet = "".join(c for c in map(chr, range(128)) if tk._ASCII_NOTHING_TO_FIX.fullmatch(c))
    assert "&" not in alphabet and "\x00" not in alphabet and "\r" not in alphabet
    weighted = alphabet + string.punctuation.replace("&", "") * 3 + "\n\t  "
    for _ in range(20_000):
        s = "".join(rng.choice(weighted) for _ in range(rng.randint(0, 60)))
        assert html.unescape(html.unescape(ftfy.fix_text(s))) == s, repr(s)


def test_missing_merges_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges file not found"):
        tk.ClipTokenizer(str(tmp_path / "nope.txt.gz"))
