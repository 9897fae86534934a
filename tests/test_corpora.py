"""Tests for the embedded corpora `numbers` (translation) and `chatter` (classify, dialogue)."""

from __future__ import annotations

import collections
import re
from decimal import Decimal

import pytest

from jaxllm.config import DataConfig
from jaxllm.data import chatter, load_records, numbers, texts_for_tokenizer
from jaxllm.data.pydocs import SPLITS

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpora"))


def _all(root: str, source: str, task: str) -> dict:
    """{split: RecordSource} and the materialised records of each split."""
    cfg = DataConfig(source=source, data_dir=root)
    sources = {s: load_records(cfg, s, task) for s in SPLITS}
    return {s: (src, [src[i] for i in range(len(src))]) for s, src in sources.items()}


@pytest.fixture(scope="module")
def nums(root):
    """All three numbers configs, prepared once (about 3 s each)."""
    return {c: _all(root, f"embedded:numbers/{c}", "translate") for c in numbers.CONFIGS}


@pytest.fixture(scope="module")
def chat(root):
    return {
        "topic": _all(root, "embedded:chatter/topic", "classify"),
        "dialogue": _all(root, "embedded:chatter", "dialogue"),  # default config for dialogue
        "language": _all(root, "embedded:chatter/language", "classify"),
    }


# ----------------------------------------------------------------------------- numbers


def test_numbers_splits_are_disjoint_and_deduplicated(nums):
    for config, splits in nums.items():
        sources = {s: [r["source"] for r in recs] for s, (_, recs) in splits.items()}
        sets = {s: set(v) for s, v in sources.items()}
        assert all(len(sets[s]) == len(sources[s]) for s in SPLITS), config  # no duplicates
        assert not sets["train"] & sets["validation"]
        assert not sets["train"] & sets["test"]
        assert not sets["validation"] & sets["test"]
        total = sum(map(len, sources.values()))
        skipped = splits["train"][0].skipped
        assert total + skipped["duplicate_source"] == numbers.NUM_CANDIDATES
        assert total == 11568, total  # measured: 10420 / 556 / 592
        assert 10000 < len(sources["train"]) < 10700
        assert 450 < len(sources["validation"]) < 700 and 450 < len(sources["test"]) < 700
    # The three configs translate the same English sentences, split the same way.
    for split in SPLITS:
        en = [sorted(r["source"] for r in nums[c][split][1]) for c in numbers.CONFIGS]
        assert en[0] == en[1] == en[2]


def test_numbers_targets_spell_every_number(nums):
    for config, splits in nums.items():
        records = [r for _, recs in splits.values() for r in recs]
        assert all(set(r) == {"source", "target"} for r in records)
        assert all(re.search(r"\d", r["source"]) for r in records)  # every source has digits
        assert not [r for r in records if re.search(r"\d", r["target"])], config  # none left
        assert all(r["target"][0].isupper() and r["target"].endswith(".") for r in records)
    de = " ".join(r["target"] for _, recs in nums["en-de"].values() for r in recs)
    for word in ("zweitausend", "Euro", "Dollar", "Cent", "Prozent", "ersten", "März", "Million"):
        assert word in de, word
    fr = " ".join(r["target"] for _, recs in nums["en-fr"].values() for r in recs)
    es = " ".join(r["target"] for _, recs in nums["en-es"].values() for r in recs)
    for word in ("euros", "mille", "premier", "quatre-vingt", "pour cent", "janvier"):
        assert word in fr, word
    for word in ("euros", "dólares", "mil", "tercer", "por ciento", "de enero de"):
        assert word in es, word


def test_numbers_verbalisation_rules():
    assert numbers._date(3, 3, 1999, "de") == "am dritten März neunzehnhundertneunundneunzig"
    assert numbers._date(1, 5, 2024, "fr") == "le premier mai deux mille vingt-quatre"
    assert numbers._date(21, 7, 1805, "es") == "el veintiuno de julio de mil ochocientos cinco"
    assert numbers._money(Decimal("45.20"), "€", "de") == "fünfundvierzig Euro und zwanzig Cent"
    assert numbers._money(Decimal("45.00"), "$", "fr") == "quarante-cinq dollars"  # no "zéro"
    assert numbers._cardinal(21500, "es") == "veintiún mil quinientos"  # num2words: veintiuno
    assert [numbers._ordinal(3, lang) for lang in numbers.LANGS] == [
        "dritten",
        "troisième",
        "tercer",
    ]
    for frame in numbers._FRAMES:  # every language fills the same slots
        assert len({numbers.frame_slots(t) for t in frame}) == 1, frame[0]
    a, dup = numbers.generate_pairs("de", 300)
    assert (a, dup) == numbers.generate_pairs("de", 300)  # seeded: the same on every run
    assert len(a) + dup == 300


# ----------------------------------------------------------------------------- chatter


def test_chatter_topic_has_about_20_imbalanced_classes(chat):
    splits = chat["topic"]
    names = splits["train"][0].label_names
    assert names == chatter.categories() and len(names) == 21
    records = [r for _, recs in splits.values() for r in recs]
    counts = collections.Counter(names[r["label"]] for r in records)
    # Measured (chatterbot-corpus 1.3.3, 898 conversations): trivia 260, ai 105, coding 98,
    # psychology 63, emotion 48, literature 43, humor 31, money 30, science 28, greetings 25,
    # conversations 23, movies 23, sports 22, botprofile 19, gossip 19, food 17, politics 15,
    # computers 10, tech_support 10, history 8, health 1.
    assert len(counts) == 21 and counts["trivia"] > 200 and counts["health"] >= 1
    assert max(counts.values()) / min(counts.values()) > 50  # heavily imbalanced
    assert len({r["label"] for r in splits["train"][1]}) >= 20
    assert all(isinstance(r["label"], int) and 0 <= r["label"] < 21 for r in records)
    assert all(set(r) == {"text", "label"} and r["text"] for r in records)
    assert sum("\n" in r["text"] for r in records) > 0.9 * len(records)  # whole conversations
    assert 0.75 < len(splits["train"][1]) / len(records) < 0.85  # 80/10/10
    openers = {s: {r["text"].split("\n")[0] for r in recs} for s, (_, recs) in splits.items()}
    assert not openers["train"] & openers["test"] and not openers["train"] & openers["validation"]
    assert splits["train"][0].skipped["malformed_conversation"] >= 1  # counted, not silent


def test_chatter_dialogue_has_histories(chat):
    records = [r for _, recs in chat["dialogue"].values() for r in recs]
    assert len(records) > 1000  # measured 1178
    assert all(set(r) == {"history", "response"} for r in records)
    assert all(isinstance(r["history"], list) and r["response"] for r in records)
    assert all(1 <= len(r["history"]) <= chatter.HISTORY_TURNS for r in records)
    assert sum(len(r["history"]) >= 2 for r in records) > 200
    assert sum(len(r["history"]) == chatter.HISTORY_TURNS for r in records) > 20
    assert all(isinstance(t, str) and t for r in records for t in r["history"])
    opener = {
        s: {r["history"][0] for r in recs if len(r["history"]) < 4}
        for s, (_, recs) in chat["dialogue"].items()
    }
    assert not opener["train"] & opener["test"]


def test_chatter_language_identification(chat):
    splits = chat["language"]
    names = splits["train"][0].label_names
    assert names == chatter.languages() and len(names) >= 25  # 28 in 1.3.3
    assert {"english", "german", "spanish", "japanese", "persian"} <= set(names)
    records = [r for _, recs in splits.values() for r in recs]
    by_text = collections.defaultdict(set)
    for r in records:
        by_text[r["text"]].add(r["label"])
    assert len(by_text) == len(records)  # distinct texts, none with two labels
    assert len({r["label"] for r in splits["train"][1]}) == len(names)
    assert len({r["label"] for r in splits["test"][1]}) >= 20
    counts = collections.Counter(names[r["label"]] for r in records)
    assert counts["english"] > 1000 and counts["telugu"] < 50  # imbalanced, as shipped
    assert splits["train"][0].skipped["ambiguous_label"] > 0


def test_chatter_serves_lm_and_tokenizer_texts(root, chat):
    cfg = DataConfig(source="embedded:chatter/topic", data_dir=root)
    lm = load_records(cfg, "validation", "lm")
    assert [lm[i] for i in range(len(lm))] == [
        {"text": r["text"]} for r in chat["topic"]["validation"][1]
    ]
    texts = list(
        texts_for_tokenizer(DataConfig(source="embedded:chatter/dialogue", data_dir=root), "train")
    )
    turns = {t for r in chat["dialogue"]["train"][1] for t in [*r["history"], r["response"]]}
    assert set(texts) == turns and len(texts) < sum(
        1 + len(r["history"]) for r in chat["dialogue"]["train"][1]
    )
    nums = list(texts_for_tokenizer(DataConfig(source="embedded:numbers", data_dir=root), "test"))
    assert len(nums) == 2 * len(
        load_records(DataConfig(source="embedded:numbers", data_dir=root), "test", "translate")
    )
