"""Tests for jaxllm.data.augment: seeded, pure text noise applied to train examples only."""

from __future__ import annotations

import json
import re
from pydoc_data.topics import topics

import numpy as np
import pytest

from jaxllm.config import AugmentConfig, load_config
from jaxllm.data import augment, pipeline
from jaxllm.data.tokenizer import cached_tokenizer

TEXTS = [topics[k] for k in sorted(topics)]
# A big sample of real prose: ~60k words.
SAMPLE = " ".join(TEXTS)[:400_000]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _n_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return cached_tokenizer(
        TEXTS, 600, str(tmp_path_factory.mktemp("tok")), name="topics", user_symbols=["<sep>"]
    )


@pytest.mark.parametrize(
    "fn",
    [augment.char_delete, augment.char_insert, augment.char_swap, augment.word_dropout,
     augment.word_swap, augment.synonym_replace],
)  # fmt: skip
def test_functions_are_pure_and_deterministic(fn):
    text = TEXTS[5]
    a, b = fn(text, 0.2, _rng(1)), fn(text, 0.2, _rng(1))
    assert a == b != text
    assert fn(text, 0.2, _rng(2)) != a
    assert fn(text, 0.0, _rng(1)) == text
    # Whitespace is structure: line breaks and indentation survive every operation.
    if fn is augment.word_dropout:  # only lines that were a single dropped word go
        assert text.count("\n") > a.count("\n") > 0.9 * text.count("\n")
    else:
        assert re.sub(r"\S", "", a) == re.sub(r"\S", "", text)


def test_word_dropout_drops_the_configured_fraction():
    words = _n_words(SAMPLE)
    assert words > 50_000
    out = augment.word_dropout(SAMPLE, 0.1, _rng(0))
    dropped = 1 - _n_words(out) / words
    assert 0.07 < dropped < 0.13, dropped
    # Survivors keep their order: the output is a subsequence of the input words.
    it = iter(SAMPLE.split())
    assert all(w in it for w in out.split())


@pytest.mark.parametrize(("fn", "sign"), [(augment.char_delete, -1), (augment.char_insert, 1)])
def test_char_operations_change_the_configured_fraction(fn, sign):
    text = SAMPLE[:100_000]
    chars = len(re.sub(r"\s", "", text))
    changed = sign * (len(re.sub(r"\s", "", fn(text, 0.05, _rng(0)))) - chars) / chars
    assert abs(changed - 0.05) < 0.01, changed


def test_word_swap_and_synonyms_change_the_configured_fraction():
    text = SAMPLE[:200_000]
    words = text.split()
    swapped = augment.word_swap(text, 0.1, _rng(0)).split()
    assert sorted(swapped) == sorted(words)  # a permutation of the same words
    moved = np.mean([a != b for a, b in zip(words, swapped, strict=True)])
    # Each hit swaps a pair (2 words move; about 10% of words start a pair).
    assert 0.12 < moved < 0.24, moved
    eligible = [w for w in words if w.lower().strip(".,;:()\"'") in augment.SYNONYMS]
    assert len(eligible) > 500
    out = augment.synonym_replace(text, 0.3, _rng(0)).split()
    changed = sum(a != b for a, b in zip(words, out, strict=True))
    assert abs(changed / len(eligible) - 0.3) < 0.05
    assert augment.synonym_replace("Big HUGE, fast.", 1.0, _rng(0), {"big": ["large"]}) == (
        "Large HUGE, fast."
    )  # a custom table; case and punctuation kept
    assert set(augment.SYNONYMS["big"]) == {"large", "huge"}


def test_augmenter_is_a_function_of_seed_index_and_epoch():
    cfg = AugmentConfig(prob=1.0, word_dropout=0.2, char_swap=0.05, seed=11)
    aug = augment.Augmenter(cfg)
    rec = {"text": TEXTS[9], "label": 3}
    a, _ = aug("classify", rec, 5, 0)
    assert a == aug("classify", rec, 5, 0)[0]  # again, in any order of calls
    assert a["label"] == 3 and rec["text"] == TEXTS[9]  # the record is not modified
    assert a != aug("classify", rec, 5, 1)[0] != aug("classify", rec, 6, 0)[0]
    other = augment.Augmenter(AugmentConfig(prob=1.0, word_dropout=0.2, char_swap=0.05, seed=12))
    assert other("classify", rec, 5, 0)[0] != a
    # prob is the share of examples that change at all.
    half = augment.Augmenter(AugmentConfig(prob=0.3, word_dropout=0.5, seed=0))
    changed = np.mean([half("lm", {"text": "a b c d e f"}, i, 0)[0]["text"] != "a b c d e f"
                       for i in range(3000)])  # fmt: skip
    assert 0.27 < changed < 0.33, changed
    # Only inputs are noised, never what the model must predict.
    pair = {"source": "the big house", "target": "das große Haus"}
    out, _ = aug("translate", pair, 0, 0)
    assert out["target"] == pair["target"]
    dia = {"history": ["a very long turn", "another turn here"], "response": "ok then sure"}
    out, _ = aug("dialogue", dia, 0, 0)
    assert out["response"] == dia["response"] and out["history"] != dia["history"]


def test_back_translation_hook_replaces_the_configured_share_of_sources():
    calls = []

    def reverse_model(targets):  # a stand-in for greedy decoding with a target->source model
        calls.append(len(targets))
        return [f"bt: {t[::-1]}" for t in targets]

    cfg = AugmentConfig(back_translate=0.25, seed=1)
    aug = augment.Augmenter(cfg, back_translate=reverse_model)
    recs = [{"source": f"s{i}", "target": f"t{i}"} for i in range(2000)]
    out = aug.apply("translate", recs, list(range(2000)), [0] * 2000)
    bt = [o for o in out if o["source"].startswith("bt: ")]
    assert 0.22 < len(bt) / 2000 < 0.28 and calls == [len(bt)]  # one batched call
    assert all(o["source"] == f"bt: {o['target'][::-1]}" for o in bt)
    assert [o["target"] for o in out] == [r["target"] for r in recs]
    assert out == aug.apply("translate", recs, list(range(2000)), [0] * 2000)
    assert not augment.Augmenter(cfg).active  # without a hook nothing changes


def _cfg(*overrides):
    base = ["data.seq_len=64", "model.max_len=64", "data.pack=true"]
    return load_config(None, base + list(overrides))


def test_pipeline_augments_the_train_split_only_and_resumes_exactly(tok):
    records = [{"source": t[:60], "target": t[60:110]} for t in TEXTS[:80]]
    noisy = _cfg("data.augment.prob=1.0", "data.augment.word_dropout=0.3",
                 "data.augment.back_translate=0.5")  # fmt: skip

    def bt(targets):
        return [t.upper() for t in targets]

    def it(cfg, split, **kw):
        return pipeline.make_task_iterator(
            cfg, tok, records, split, "translate", 8, back_translate=bt, **kw
        )

    # Evaluation data is never augmented.
    for split in ("validation", "test"):
        for a, b in zip(it(noisy, split), it(_cfg(), split), strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # Train data is, and a resumed run (2 processes -> 1) sees the same augmented batches.
    plain = next(it(_cfg(), "train"))
    hosts = [it(noisy, "train", process_index=i, process_count=2) for i in range(2)]
    first = [next(h) for h in hosts]
    assert not np.array_equal(np.concatenate([f["inputs"] for f in first]), plain["inputs"])
    for _ in range(12):  # past the first epoch (80 records): new noise per epoch
        for h in hosts:
            next(h)
    state = json.loads(json.dumps(hosts[0].get_state()))
    assert state["augment"]["word_dropout"] == 0.3
    later = [[next(h) for _ in range(6)] for h in hosts]
    single = it(noisy, "train")
    single.set_state(state)
    for step in range(6):
        got = next(single)
        for k in got:
            want = np.concatenate([later[0][step][k], later[1][step][k]])
            np.testing.assert_array_equal(got[k], want)
