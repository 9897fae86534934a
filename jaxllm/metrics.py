"""Evaluation metrics: perplexity, classification scores, BLEU/chrF, ROUGE, exact match, A/B tests.

Pure Python/numpy on host values (no JAX): the eval loop gathers per-example outputs or summed
statistics across devices and hosts first, then calls these functions once.

Scales follow the reference tools so numbers can be compared with published ones: BLEU and chrF
are 0-100 (sacrebleu); accuracy, F1, ROUGE and exact match are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# exp() of anything above this overflows a float64.
_MAX_LOG = math.log(np.finfo(np.float64).max)


def perplexity(ce_sum: Any, weight_sum: Any) -> float:
    """Token-weighted perplexity: ``exp(sum(ce) / sum(weights))``.

    Args:
        ce_sum: Summed token negative log-likelihood in nats: a scalar or per-batch sums, which
            are added up first, so every token counts equally however uneven the batches.
        weight_sum: Number (or summed weight) of scored tokens, scalar or per-batch.

    Returns:
        The perplexity; ``inf`` (not ``OverflowError``) when the mean NLL overflows exp.

    Raises:
        ValueError: If the total weight is not positive.
    """
    ce = float(np.sum(np.asarray(ce_sum, dtype=np.float64)))
    w = float(np.sum(np.asarray(weight_sum, dtype=np.float64)))
    if not w > 0:
        raise ValueError(f"perplexity needs a positive token weight, got {w}")
    mean_nll = ce / w
    return math.inf if mean_nll > _MAX_LOG else math.exp(mean_nll)


def _int_arrays(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds).reshape(-1).astype(np.int64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to the label.

    Args:
        preds: Predicted class ids (any shape; flattened).
        labels: True class ids, same number of elements.

    Returns:
        Accuracy in [0, 1]; 0.0 for empty input.
    """
    p, y = _int_arrays(preds, labels)
    return float(np.mean(p == y)) if p.size else 0.0


def confusion_matrix(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows are true classes, columns predicted (sklearn order).

    Args:
        preds: Predicted class ids in ``[0, num_classes)``.
        labels: True class ids in ``[0, num_classes)``.
        num_classes: Number of classes.

    Returns:
        An int64 array of shape ``(num_classes, num_classes)``; ValueError for ids out of range.
    """
    p, y = _int_arrays(preds, labels)
    for name, a in (("preds", p), ("labels", y)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got {a.min()}..{a.max()}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, predicted + support)  # == 2PR/(P+R), 0 where tp+fp+fn == 0
    return precision, recall, f1, support


def f1_scores(preds: Any, labels: Any, num_classes: int) -> dict[str, float]:
    """Macro, micro and support-weighted F1 for single-label classification.

    Every class in ``range(num_classes)`` takes part, as in scikit-learn's
    ``f1_score(..., labels=range(num_classes), zero_division=0)``: a precision, recall or F1
    whose denominator is zero counts as 0. So a class with no support and no predictions scores
    F1 = 0 and still counts in the macro average (it has weight 0 in the weighted average).
    Micro F1 pools all decisions; for single-label data it equals accuracy.

    Args:
        preds: Predicted class ids.
        labels: True class ids.
        num_classes: Number of classes.

    Returns:
        ``{"macro_f1", "micro_f1", "weighted_f1"}``, floats in [0, 1].
    """
    cm = confusion_matrix(preds, labels, num_classes)
    _, _, f1, support = _per_class(cm)
    tp = float(np.trace(cm))
    total = float(cm.sum())
    micro = float(_safe_div(2 * tp, 2 * total))  # predicted total == support total
    weighted = float(np.sum(f1 * support) / total) if total else 0.0
    return {"macro_f1": float(np.mean(f1)), "micro_f1": micro, "weighted_f1": weighted}


def classification_report(preds: Any, labels: Any, label_names: Sequence[str]) -> dict:
    """Per-class precision/recall/F1/support, like sklearn's ``output_dict=True`` report.

    Class ``i`` is named ``label_names[i]``; the number of classes is ``len(label_names)``.
    Zero denominators give 0 (``zero_division=0``), as in :func:`f1_scores`.

    Args:
        preds: Predicted class ids.
        labels: True class ids.
        label_names: One name per class id.

    Returns:
        ``{name: {"precision", "recall", "f1", "support"}, ..., "accuracy": float,
        "macro avg": {...}, "weighted avg": {...}}``.
    """
    n = len(label_names)
    cm = confusion_matrix(preds, labels, n)
    precision, recall, f1, support = _per_class(cm)
    report: dict[str, Any] = {}
    for i, name in enumerate(label_names):
        report[str(name)] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    total = int(support.sum())
    weights = support / total if total else np.zeros(n)
    report["accuracy"] = float(np.trace(cm) / total) if total else 0.0
    for key, w in (("macro avg", np.full(n, 1.0 / n)), ("weighted avg", weights)):
        report[key] = {
            "precision": float(np.sum(precision * w)),
            "recall": float(np.sum(recall * w)),
            "f1": float(np.sum(f1 * w)),
            "support": total,
        }
    return report


def _reference_streams(hypotheses: Sequence[str], references: Sequence) -> list[list[str]]:
    """sacrebleu's layout ``refs[k][i]`` (k-th reference of example i); one stream accepted too."""
    if len(references) and isinstance(references[0], str):
        references = [references]
    streams = [list(stream) for stream in references]
    for stream in streams:
        if len(stream) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses, {len(stream)} references")
    return streams


def bleu(hypotheses: Sequence[str], references: Sequence) -> dict[str, Any]:
    """Corpus BLEU with sacrebleu's defaults on detokenised text (same as the sacrebleu CLI).

    Args:
        hypotheses: One detokenised system output per example.
        references: Either one reference string per example, or a list of reference streams
            (sacrebleu's layout: ``references[k][i]`` is the k-th reference for example i).

    Returns:
        ``{"score"`` (0-100), ``"precisions"``, ``"bp"``, ``"sys_len"``, ``"ref_len"``,
        ``"signature"`` (the sacrebleu signature string)``}``.
    """
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(hypotheses, references)
    metric = BLEU()
    s = metric.corpus_score(list(hypotheses), streams)
    return {
        "score": float(s.score),
        "precisions": [float(x) for x in s.precisions],
        "bp": float(s.bp),
        "sys_len": int(s.sys_len),
        "ref_len": int(s.ref_len),
        "signature": str(metric.get_signature()),
    }


def chrf(hypotheses: Sequence[str], references: Sequence) -> dict[str, Any]:
    """Corpus chrF (chrF2, sacrebleu defaults) on detokenised text, same as the sacrebleu CLI.

    Args:
        hypotheses: One detokenised system output per example.
        references: As in :func:`bleu`.

    Returns:
        ``{"score"`` (0-100), ``"signature"}``.
    """
    from sacrebleu.metrics import CHRF

    streams = _reference_streams(hypotheses, references)
    metric = CHRF()
    s = metric.corpus_score(list(hypotheses), streams)
    return {"score": float(s.score), "signature": str(metric.get_signature())}


def rouge(predictions: Sequence[str], references: Sequence) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures from the ``rouge-score`` package (Porter stemmer on).

    Args:
        predictions: One generated text per example.
        references: One reference per example; an entry may be a list of references, scored
            with ``score_multi`` (best reference per metric).

    Returns:
        ``{"rouge1", "rouge2", "rougeL"}`` averaged over examples, in [0, 1]; zeros if empty.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        if isinstance(ref, str):
            scores = scorer.score(ref, pred)  # rouge-score's order is (target, prediction)
        else:
            scores = scorer.score_multi(list(ref), pred)
        for k in keys:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: totals[k] / n for k in keys}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation.

    Strips both ends and collapses whitespace runs to one space; case and punctuation count.

    Args:
        predictions: Generated strings.
        references: Reference strings, one per prediction.

    Returns:
        Exact match in [0, 1]; 0.0 for empty input.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    same = [
        " ".join(p.split()) == " ".join(r.split())
        for p, r in zip(predictions, references, strict=True)
    ]
    return sum(same) / len(same) if same else 0.0


def _resample_indices(n: int, n_samples: int, seed: int) -> np.ndarray:
    # The same draw as sacrebleu's paired bootstrap, so both see identical resamples.
    return np.random.default_rng(seed).choice(n, size=(n_samples, n), replace=True)


def _delta_summary(a: float, b: float, deltas: np.ndarray) -> dict[str, Any]:
    delta = b - a
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    p = 1.0 if delta == 0 else float(np.mean(np.sign(deltas) != np.sign(delta)))  # flip/zero
    return {"a": a, "b": b, "delta": delta, "ci95": (float(lo), float(hi)), "p_value": p}


def paired_bootstrap(
    metric_fn: Callable[[Sequence, Sequence], float],
    sys_a: Sequence,
    sys_b: Sequence,
    refs: Sequence,
    n_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap resampling (Koehn, 2004) for any corpus-level metric.

    Each resample draws example indices with replacement and scores both systems on the same
    draw. ``delta = b - a`` (A is the baseline). The 95% interval is the 2.5/97.5 percentiles
    of the resampled deltas. The p-value is one-sided in the observed direction: the fraction
    of resamples whose delta has the opposite sign or is zero, i.e. how often B fails to beat
    A when it won on the full set (or vice versa). An observed delta of exactly 0 gives
    ``p_value = 1.0``.

    Args:
        metric_fn: ``metric_fn(outputs, refs) -> float``; a corpus-level score, higher better.
        sys_a: Per-example outputs of the baseline.
        sys_b: Per-example outputs of the other system, aligned with ``sys_a``.
        refs: Per-example references, aligned with the outputs.
        n_samples: Number of bootstrap resamples.
        seed: Seed of the numpy generator; equal seeds give equal results.

    Returns:
        ``{"a", "b", "delta", "ci95": (lo, hi), "p_value"}``.
    """
    n = len(refs)
    if not (len(sys_a) == len(sys_b) == n) or n == 0:
        raise ValueError(f"need equal non-zero lengths, got {len(sys_a)}, {len(sys_b)}, {n}")
    a = float(metric_fn(sys_a, refs))
    b = float(metric_fn(sys_b, refs))
    deltas = np.empty(n_samples)
    for s, idx in enumerate(_resample_indices(n, n_samples, seed)):
        ra = [sys_a[i] for i in idx]
        rb = [sys_b[i] for i in idx]
        rr = [refs[i] for i in idx]
        deltas[s] = float(metric_fn(rb, rr)) - float(metric_fn(ra, rr))
    return _delta_summary(a, b, deltas)


def bleu_paired_bootstrap(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    refs: Sequence,
    n_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap for corpus BLEU, with sacrebleu's own test when it is available.

    With sacrebleu >= 2 the p-value comes from ``sacrebleu.significance._paired_bs_test`` (the
    function behind ``sacrebleu REF -i A B --paired-bs``; it replicates Moses'
    ``bootstrap-hypothesis-difference-significance.pl``). That test is two-sided: it counts
    resamples whose mean-centred absolute delta exceeds the observed absolute delta, with +1
    smoothing, ``p = (c + 1) / (n_samples + 1)``. Unlike sacrebleu, an observed delta of
    exactly 0 reports ``p_value = 1.0`` (sacrebleu would give ``1 / (n_samples + 1)`` for two
    identical systems). ``ci95`` is the 2.5/97.5 percentile interval of ``b - a`` over the very
    same resamples (same generator and seed), recomputed from BLEU sufficient statistics.
    Without that function, falls back to :func:`paired_bootstrap` with corpus BLEU
    (one-sided p-value, see there); ``"method"`` says which was used.

    Args:
        hyps_a: Baseline hypotheses (detokenised).
        hyps_b: Other system's hypotheses.
        refs: References, as in :func:`bleu`.
        n_samples: Number of bootstrap resamples.
        seed: Seed of the numpy generator.

    Returns:
        ``{"a", "b", "delta", "ci95": (lo, hi), "p_value", "method", "signature"}``; scores
        are BLEU on the 0-100 scale.
    """
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(hyps_a, refs)
    _reference_streams(hyps_b, refs)
    try:
        from sacrebleu.significance import Result, _paired_bs_test
    except ImportError:
        per_example = list(zip(*streams, strict=True))  # the references of each example
        bleu_fn = lambda h, r: bleu(h, list(zip(*r, strict=True)))["score"]  # noqa: E731
        out = paired_bootstrap(bleu_fn, hyps_a, hyps_b, per_example, n_samples, seed)
        out["method"] = "generic paired bootstrap (one-sided)"
        out["signature"] = bleu(hyps_a, streams)["signature"]
        return out

    metric = BLEU()
    stats_a = metric._extract_corpus_statistics(list(hyps_a), streams)
    score_a = metric._aggregate_and_compute(stats_a)
    baseline = {score_a.name: (stats_a, Result(score_a.score))}
    _, results = _paired_bs_test(
        baseline, "b", list(hyps_b), streams, {score_a.name: metric}, n_samples, -1, seed
    )
    res_b = results[score_a.name]
    stats_b = metric._extract_corpus_statistics(list(hyps_b), streams)
    sa = np.asarray(stats_a, dtype=np.float32)  # float32 as in sacrebleu
    sb = np.asarray(stats_b, dtype=np.float32)
    idxs = _resample_indices(len(hyps_a), n_samples, seed)
    deltas = np.array(
        [
            metric._compute_score_from_stats(sb[i].sum(0)).score
            - metric._compute_score_from_stats(sa[i].sum(0)).score
            for i in idxs
        ]
    )
    out = _delta_summary(float(score_a.score), float(res_b.score), deltas)
    if out["delta"] != 0:
        out["p_value"] = float(res_b.p_value)
    sig = metric.get_signature()
    sig.update("seed", str(seed))
    sig.update("bs", n_samples)
    out["method"] = "sacrebleu paired bootstrap (two-sided)"
    out["signature"] = str(sig)
    return out
