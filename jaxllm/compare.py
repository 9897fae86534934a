"""A/B comparison of two trained models on the same eval split (`jaxllm eval --compare A B`).

Both models are evaluated on the very same examples; the difference in the task's
main metric is tested by paired bootstrap resampling (Koehn, 2004): ``delta = B - A``
with a 95% percentile interval and a p-value. BLEU uses sacrebleu's own paired
bootstrap (:func:`jaxllm.metrics.bleu_paired_bootstrap`), every other metric the
generic one (:func:`jaxllm.metrics.paired_bootstrap`) with the same resamples.

The resampling unit is the example: a sentence (translate, dialogue), a labelled
text (classify), or an eval row of tokens for perplexity (lm), where both models
must then share the tokenizer and windows, since perplexities over different
tokenizations are not comparable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxllm import metrics
from jaxllm.errors import UserError
from jaxllm.evaluation import LOWER_IS_BETTER, evaluate, main_metric, text_metric
from jaxllm.workdir import restore_params, workdir_config


def _run(workdir: str, overrides: list[str], metric: str) -> tuple[Any, dict]:
    cfg = workdir_config(workdir, overrides)
    session, params, step = restore_params(workdir, cfg)
    result = evaluate(
        session, params, max_batches=0, generate=metric not in ("perplexity",), keep_outputs=True
    )
    result["step"] = step
    if metric == "perplexity":
        result["tokenizer"] = getattr(session.tokenizer, "fingerprint", "")
    return cfg, result


def _check_same_data(cfg_a: Any, cfg_b: Any, a: dict, b: dict, metric: str) -> None:
    for key in ("task", "data.source", "data.eval_split"):
        va, vb = (
            getattr(cfg_a, key) if "." not in key else getattr(cfg_a.data, key.split(".")[1]),
            getattr(cfg_b, key) if "." not in key else getattr(cfg_b.data, key.split(".")[1]),
        )
        if va != vb:
            raise UserError(
                f"the two workdirs differ in {key} ({va!r} vs {vb!r}); compare models "
                f"evaluated on the same data, or override {key}=... for one of them"
            )
    if metric == "perplexity" and (
        a.get("tokenizer") != b.get("tokenizer") or cfg_a.data.seq_len != cfg_b.data.seq_len
    ):
        raise UserError(
            "perplexity of models with different tokenizers or data.seq_len is not "
            "comparable; compare a text metric (eval.main_metric=bleu, ...) instead"
        )


def _bootstrap(metric: str, oa: dict, ob: dict, n: int, seed: int) -> dict[str, Any]:
    if metric == "bleu":
        return metrics.bleu_paired_bootstrap(
            oa["hypotheses"], ob["hypotheses"], oa["references"], n, seed
        )
    if metric == "perplexity":
        if len(oa["row_ce"]) != len(ob["row_ce"]):
            raise UserError("the two models scored different numbers of eval rows")
        rows_a = list(zip(oa["row_ce"], oa["row_weight"], strict=True))
        rows_b = list(zip(ob["row_ce"], ob["row_weight"], strict=True))

        def ppl(rows, _refs):
            ce, w = np.sum(np.asarray(rows), axis=0)
            return math.exp(min(ce / max(w, 1e-9), 50.0))

        return metrics.paired_bootstrap(ppl, rows_a, rows_b, [None] * len(rows_a), n, seed)
    if metric in ("accuracy", "macro_f1", "micro_f1"):
        labels = oa["labels"].tolist()
        if labels != ob["labels"].tolist():
            raise UserError("the two models were scored on different labels; same split?")
        n_cls = int(max(labels + oa["predictions"].tolist() + ob["predictions"].tolist())) + 1

        def score(preds, refs):
            if metric == "accuracy":
                return metrics.accuracy(preds, refs)
            return metrics.f1_scores(preds, refs, n_cls)[metric]

        return metrics.paired_bootstrap(
            score, oa["predictions"].tolist(), ob["predictions"].tolist(), labels, n, seed
        )
    if oa["references"] != ob["references"]:
        raise UserError("the two models were scored on different references; same split?")
    return metrics.paired_bootstrap(
        lambda h, r: text_metric(metric, list(h), list(r)),
        oa["hypotheses"],
        ob["hypotheses"],
        oa["references"],
        n,
        seed,
    )


def compare_workdirs(dir_a: str, dir_b: str, overrides: list[str]) -> dict[str, Any]:
    """Evaluates both workdirs on the same split and bootstraps the main-metric difference.

    Args:
      dir_a: The baseline workdir (A).
      dir_b: The other workdir (B); ``delta = B - A``.
      overrides: ``key=value`` settings applied to both (e.g. ``eval.main_metric=chrf``).

    Returns:
      ``{"metric", "higher_is_better", "a", "b", "delta", "ci95", "p_value", "n",
      "samples", "workdirs", "metrics_a", "metrics_b"}`` (plus ``method``/``signature``
      for BLEU).

    Raises:
      UserError: If the workdirs differ in task or data, or the metric does not apply.
    """
    cfg_a = workdir_config(dir_a, overrides)
    metric = main_metric(cfg_a)
    cfg_a, res_a = _run(dir_a, overrides, metric)
    cfg_b, res_b = _run(dir_b, overrides, metric)
    _check_same_data(cfg_a, cfg_b, res_a, res_b, metric)
    oa, ob = res_a.pop("outputs"), res_b.pop("outputs")
    e = cfg_a.eval
    test = _bootstrap(metric, oa, ob, e.bootstrap_samples, e.seed)
    n = len(oa.get("references") or oa.get("labels", oa.get("row_ce", [])))
    flat = lambda r: {k: v for k, v in r.items() if isinstance(v, int | float)}  # noqa: E731
    return {
        "metric": metric,
        "higher_is_better": metric not in LOWER_IS_BETTER,
        **{k: test[k] for k in ("a", "b", "delta", "p_value")},
        "ci95": list(test["ci95"]),
        **{k: test[k] for k in ("method", "signature") if k in test},
        "n": int(n),
        "samples": e.bootstrap_samples,
        "workdirs": {"a": dir_a, "b": dir_b},
        "metrics_a": flat(res_a),
        "metrics_b": flat(res_b),
    }
