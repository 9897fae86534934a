"""Metrics against hand-worked examples and against the sacrebleu command line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import metrics as M

# Hand-worked example, num_classes=4 (class 3 never occurs: no support, no predictions).
#   confusion (rows true, cols predicted): [[2,1,0,0],[0,1,1,0],[0,0,1,0],[0,0,0,0]]
#   class 0: P=2/2  R=2/3  F1=4/5;  class 1: P=1/2 R=1/2 F1=1/2;  class 2: P=1/2 R=1/1 F1=2/3
#   class 3: F1=0 (zero_division=0)
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 2, 2]


def test_accuracy_and_confusion_matrix_hand_worked():
    assert M.accuracy(PREDS, LABELS) == pytest.approx(4 / 6)
    cm = M.confusion_matrix(PREDS, LABELS, 4)
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert cm.dtype == np.int64
    with pytest.raises(ValueError, match="lie in"):
        M.confusion_matrix([0, 5], [0, 1], 4)
    with pytest.raises(ValueError, match="length"):
        M.accuracy([0, 1], [0])


def test_f1_scores_hand_worked():
    f = M.f1_scores(PREDS, LABELS, num_classes=4)
    assert f["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3 + 0) / 4)  # = 59/120
    assert f["micro_f1"] == pytest.approx(4 / 6)  # pooled tp / total = accuracy
    assert f["weighted_f1"] == pytest.approx((3 * 4 / 5 + 2 * 1 / 2 + 1 * 2 / 3) / 6)  # = 61/90
    # Without the empty class the macro average is over three classes.
    f3 = M.f1_scores(PREDS, LABELS, num_classes=3)
    assert f3["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert f3["weighted_f1"] == pytest.approx(f["weighted_f1"])
    perfect = M.f1_scores([1, 0, 2], [1, 0, 2], 3)
    assert perfect == {"macro_f1": 1.0, "micro_f1": 1.0, "weighted_f1": 1.0}


def test_classification_report_hand_worked():
    r = M.classification_report(PREDS, LABELS, ["neg", "neu", "pos", "other"])
    assert r["neg"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert r["neu"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert r["pos"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert r["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro avg"]["f1"] == pytest.approx(59 / 120)
    assert r["macro avg"]["precision"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert r["weighted avg"]["f1"] == pytest.approx(61 / 90)
    assert r["weighted avg"]["recall"] == pytest.approx(4 / 6)
    assert r["macro avg"]["support"] == 6


def test_perplexity_uniform_equals_vocab_and_is_token_weighted():
    vocab = 50
    logits = np.zeros((3, 7, vocab))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    n_tokens = 3 * 7
    assert M.perplexity(-logp[..., 0].sum(), n_tokens) == pytest.approx(vocab)
    # Uneven batches: summed NLL over summed tokens, not the mean of per-batch perplexities.
    ce = [2.0 * 10, 4.0 * 2]
    w = [10, 2]
    assert M.perplexity(ce, w) == pytest.approx(math.exp(28 / 12))
    assert M.perplexity(ce, w) != pytest.approx((math.exp(2.0) + math.exp(4.0)) / 2)
    assert M.perplexity(1e6, 1.0) == math.inf
    with pytest.raises(ValueError, match="positive"):
        M.perplexity(1.0, 0)


HYPS = [
    "Die Katze sitzt auf der Matte.",
    "Zweihundertdreiundzwanzig Äpfel, bitte!",
    "Er kam am 3. März 2021 an.",
    "Das ist ein Test",
    "Guten Morgen, wie geht es Ihnen heute?",
    "neunzehn",
]
REFS = [
    "Die Katze saß auf der Matte.",
    "Zweihundertdreiundzwanzig Äpfel bitte.",
    "Er ist am 3. März 2021 angekommen.",
    "Das ist ein Test.",
    "Guten Morgen, wie geht es dir heute?",
    "neunzehn",
]
REFS2 = [
    "Auf der Matte sitzt die Katze.",
    "Bitte zweihundertdreiundzwanzig Äpfel!",
    "Er kam am 3. März 2021.",
    "Dies ist ein Test.",
    "Guten Morgen! Wie geht es Ihnen heute?",
    "Neunzehn",
]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _cli(args, env=None):
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", *args, "-f", "json", "-w", "10"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout)


def test_bleu_chrf_identical_to_sacrebleu_cli(tmp_path):
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    ref = _write(tmp_path / "ref.txt", REFS)
    ref2 = _write(tmp_path / "ref2.txt", REFS2)
    for refs, files in (([REFS], [ref]), ([REFS, REFS2], [ref, ref2])):
        cli_bleu, cli_chrf = _cli([*files, "-i", hyp, "-m", "bleu", "chrf"])
        b = M.bleu(HYPS, refs)
        c = M.chrf(HYPS, refs)
        assert round(b["score"], 10) == cli_bleu["score"]
        assert round(c["score"], 10) == cli_chrf["score"]
        assert b["signature"] == cli_bleu["signature"]
        assert c["signature"] == cli_chrf["signature"]
        assert 0 < b["score"] < 100 and 0 < c["score"] < 100
    # A single reference stream may be passed as a plain list of strings.
    assert M.bleu(HYPS, REFS) == M.bleu(HYPS, [REFS])
    assert M.bleu(REFS, REFS)["score"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="6 hypotheses, 5 references"):
        M.bleu(HYPS, REFS[:-1])


def test_rouge_hand_computed_overlap():
    # Pair 1: unigrams 5/6 both ways; bigrams the-cat, on-the, the-mat = 3 of 5; LCS 5 of 6.
    # Pair 2 (stemmed): [the, cat, are, run] vs [a, cat, run]: 2 shared unigrams -> P=1/2,
    # R=2/3, F=4/7; no shared bigram; LCS "cat run" = 2 -> F=4/7.
    preds = ["the cat sat on the mat", "The cats are running"]
    refs = ["the cat lay on the mat", "a cat runs"]
    r = M.rouge(preds, refs)
    assert r["rouge1"] == pytest.approx((5 / 6 + 4 / 7) / 2)
    assert r["rouge2"] == pytest.approx((3 / 5 + 0) / 2)
    assert r["rougeL"] == pytest.approx((5 / 6 + 4 / 7) / 2)
    # Several references per example: the best one counts.
    multi = M.rouge(["the cat sat"], [["a dog barked", "the cat sat"]])
    assert multi == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_exact_match_normalises_whitespace_only():
    preds = ["  hello   world ", "Hello world", "a\tb\nc", "x."]
    refs = ["hello world", "hello world", "a b c", "x"]
    assert M.exact_match(preds, refs) == pytest.approx(2 / 4)
    assert M.exact_match([], []) == 0.0


def _accuracy_metric(outputs, refs):
    return M.accuracy(outputs, refs)


def test_paired_bootstrap_identical_better_and_seeded():
    rng = np.random.default_rng(1)
    refs = list(rng.integers(0, 3, size=60))
    noisy = [int(r) if rng.random() < 0.5 else int((r + 1) % 3) for r in refs]
    same = M.paired_bootstrap(_accuracy_metric, noisy, noisy, refs, n_samples=300)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0 and same["ci95"] == (0.0, 0.0)

    better = [int(r) if rng.random() < 0.95 else int((r + 1) % 3) for r in refs]
    out = M.paired_bootstrap(_accuracy_metric, noisy, better, refs, n_samples=500, seed=3)
    assert out["a"] == pytest.approx(M.accuracy(noisy, refs))
    assert out["b"] == pytest.approx(M.accuracy(better, refs))
    assert out["delta"] == pytest.approx(out["b"] - out["a"]) and out["delta"] > 0.2
    assert out["p_value"] < 0.05
    lo, hi = out["ci95"]
    assert 0 < lo < out["delta"] < hi
    # Direction-aware: swapping the systems flips the delta and interval, same p-value.
    rev = M.paired_bootstrap(_accuracy_metric, better, noisy, refs, n_samples=500, seed=3)
    assert rev["delta"] == pytest.approx(-out["delta"])
    assert rev["ci95"] == pytest.approx((-hi, -lo))
    assert rev["p_value"] == out["p_value"]
    # Deterministic under a seed, different under another.
    again = M.paired_bootstrap(_accuracy_metric, noisy, better, refs, n_samples=500, seed=3)
    assert again == out
    other = M.paired_bootstrap(_accuracy_metric, noisy, better, refs, n_samples=500, seed=4)
    assert other["ci95"] != out["ci95"]


def _mt_systems(n=40):
    rng = np.random.default_rng(0)
    words = ["die", "der", "das", "katze", "hund", "sitzt", "auf", "matte", "tisch", "heute"]
    refs = [" ".join(rng.choice(words, size=8)) for _ in range(n)]

    def corrupt(s, p):
        return " ".join(w if rng.random() > p else rng.choice(words) for w in s.split())

    return refs, [corrupt(r, 0.5) for r in refs], [corrupt(r, 0.1) for r in refs]


def test_bleu_paired_bootstrap_matches_sacrebleu_cli(tmp_path):
    refs, weak, strong = _mt_systems()
    close = [strong[i] if i in (0, 1) else weak[i] for i in range(len(weak))]
    ref = _write(tmp_path / "ref.txt", refs)
    a = _write(tmp_path / "a.txt", weak)
    b = _write(tmp_path / "b.txt", close)
    env = {**os.environ, "SACREBLEU_SEED": "7"}
    cli = _cli([ref, "-i", a, b, "--paired-bs", "-m", "bleu"], env=env)
    out = M.bleu_paired_bootstrap(weak, close, refs, seed=7)
    assert out["method"].startswith("sacrebleu")
    assert out["a"] == pytest.approx(cli[0]["BLEU"]["score"], abs=1e-9)
    assert out["b"] == pytest.approx(cli[1]["BLEU"]["score"], abs=1e-9)
    assert out["p_value"] == pytest.approx(cli[1]["BLEU"]["p_value"], abs=1e-12)
    assert 0.01 < out["p_value"] < 1  # a small gain: not significant, and not the floor

    clear = M.bleu_paired_bootstrap(weak, strong, refs, seed=0)
    assert clear["delta"] > 10 and clear["p_value"] < 0.05 and clear["ci95"][0] > 0
    assert clear == M.bleu_paired_bootstrap(weak, strong, refs, seed=0)
    assert "bs:1000" in clear["signature"] and "seed:0" in clear["signature"]

    same = M.bleu_paired_bootstrap(weak, weak, refs, seed=0)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0 and same["ci95"] == (0.0, 0.0)


def test_bleu_paired_bootstrap_generic_fallback(monkeypatch):
    refs, weak, strong = _mt_systems(20)
    monkeypatch.setitem(sys.modules, "sacrebleu.significance", None)  # import now fails
    out = M.bleu_paired_bootstrap(weak, strong, refs, n_samples=100, seed=0)
    assert out["method"].startswith("generic")
    assert out["a"] == pytest.approx(M.bleu(weak, refs)["score"])
    assert out["b"] == pytest.approx(M.bleu(strong, refs)["score"])
    assert out["p_value"] < 0.05 and out["ci95"][0] > 0
