"""A caption workload for the tokenizer: real English prose, BPE vocabulary words, noise
(HTML entities, control characters, unicode whitespace, emoji, mojibake) and overlong
captions. The parity test (tests/test_tokenizer.py) and the benchmark use the same set."""
import inspect
import random

from pipeline.tokenizer import get_tokenizer

EDGE_CASES = [
    "", " ", "\t\n  \r\n", "a", "A photo of a DOG.", "it's the cat's toy, isn't it? they'll've",
    "emoji 🐶🐱 party 🎉🎉🎉 and flags 🇫🇷 and zwj 👩‍👩‍👧", "日本語のキャプション、東京タワー", "العربية نص", "Ελληνικά κείμενο",
    "café naïve façade Œuvre ß", "e\u0301 combining accents", "fullwidth ＬＯＵＤ　ＮＯＩＳＥＳ",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#x27;apos&#x27; &nbsp;space&#160;", "&amp;amp;amp; triple",
    "<b>html</b> tags & entities &amp; mixed", "mojibake sÃ³ and â€œquotesâ€\x9d", "curly “quotes” ‘single’",
    "control\x00chars\x07here\x1b[31mred\x1b[0m", "tabs\tand\nnewlines\r\nand\u2028separators\u3000ideographic",
    "multiple     spaces      collapse", "  leading and trailing  ", "<start_of_text> literal <end_of_text> tokens",
    "numbers 1234567890 3.14159 1e-4 #hashtag @user http://example.com/a?b=c&d=e",
    "ligature ﬁﬂ ﬀ", "surrogate-ish \ud83d text", "DSC01234.JPG IMG_1234", "x" * 500,
    " ".join(["word"] * 200), "a very long caption " * 40, "🙂" * 100,
]


def real_sentences() -> list[str]:
    """Real English prose that ships with Python: stdlib docstrings, split into sentences."""
    import collections, email, http.server, json, logging, pathlib, re, statistics, tarfile, textwrap, urllib.parse
    text = " ".join(inspect.getdoc(obj) or "" for mod in (collections, email, http.server, json, logging, pathlib, re,
                                                            statistics, tarfile, textwrap, urllib.parse)
                    for _, obj in inspect.getmembers(mod))
    return [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]


def varied_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = real_sentences()
    bpe_words = [w.replace("</w>", "") for w in list(get_tokenizer().encoder)[512:49406]]
    noise = list("&<>;#'\"\t\n\r\x00\x1f\x7f\u00a0\u2028\u3000") + ["&amp;", "&lt;", "&#39;", "&nbsp;", "🐶", "é", "Ã©", "ﬁ"]
    out = list(EDGE_CASES)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:
            cap = rng.choice(sentences)
        elif kind < 0.7:
            cap = " ".join(rng.choice(bpe_words) for _ in range(rng.randint(1, 30)))
        elif kind < 0.9:
            cap = rng.choice(sentences)
            for _ in range(rng.randint(1, 5)):
                i = rng.randint(0, len(cap))
                cap = cap[:i] + rng.choice(noise) + cap[i:]
        else:
            cap = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8)))  # overlong
        out.append(cap.upper() if rng.random() < 0.05 else cap)
    return out
