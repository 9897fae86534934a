"""Task evaluation: the metrics of each task on the eval split, computed on the whole mesh.

- every task: token- (or example-) weighted loss over the eval split through the
  sharded eval step (every device and host scores its rows; sums are reduced);
- ``lm``, ``translate``, ``dialogue``: perplexity and next-token accuracy;
- ``classify``: accuracy, macro/micro F1, the per-class report and confusion matrix,
  and the majority-class baseline (the most frequent training label);
- ``translate`` / ``dialogue`` (with ``generate=True``): the eval sources are decoded
  (greedy or beam, ``eval.*``) in sharded batches and the detokenised outputs are
  scored against the raw reference text: BLEU and chrF (sacrebleu), ROUGE-1/2/L
  (rouge-score), exact match.

Every final eval also reports the trivial baseline a model must beat: the majority
class (classify), an add-one unigram model of the training targets
(``baseline_perplexity``), and for decoding the source copied (translate) or the last
turn echoed back (dialogue) as the hypothesis (``baseline_bleu/chrf/rouge_l``).

Inputs rejected by ``input_filter.*`` are left out and reported (counts per rule and
the list), and ``eval.char_noise`` adds ``noisy_*`` metrics on character-noised inputs
(:mod:`jaxllm.robust_eval`).

With ``keep_outputs=True`` the per-example outputs come back under ``"outputs"`` so
that two models can be compared by paired bootstrap (:mod:`jaxllm.compare`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np

from jaxllm import data, metrics, robust_eval, sharding
from jaxllm.data.formats import LengthLimits, fit_length, format_records
from jaxllm.errors import UserError
from jaxllm.tasks import SEQ2SEQ_TASKS

log = logging.getLogger(__name__)

# The metric `eval --compare` tests by default, and whether higher is better.
MAIN_METRIC = {
    "lm": "perplexity",
    "classify": "accuracy",
    "translate": "bleu",
    "dialogue": "rouge_l",
}
LOWER_IS_BETTER = ("perplexity", "loss")
TEXT_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rouge_l", "exact_match")
COMPARABLE = {
    "lm": ("perplexity",),
    "classify": ("accuracy", "macro_f1", "micro_f1"),
    "translate": ("perplexity", *TEXT_METRICS),
    "dialogue": ("perplexity", *TEXT_METRICS),
}


def main_metric(cfg: Any) -> str:
    """`eval.main_metric`, or the task's default; checked against what the task reports."""
    name = cfg.eval.main_metric or MAIN_METRIC[cfg.task]
    if name not in COMPARABLE[cfg.task]:
        raise UserError(
            f"eval.main_metric={name!r} is not a metric of task={cfg.task}; valid: "
            f"{', '.join(COMPARABLE[cfg.task])}"
        )
    return name


def batch_iterator(session: Any, split: str, train: bool, records: Any = None):
    """This process's batches of `split`: shuffled and repeating for training, one pass else.

    `records` replaces the split's own records (filtered or noised eval inputs).
    """
    cfg = session.cfg
    kw = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=cfg.train.seed,
        shuffle=train,
        repeat=train,
    )
    if cfg.task == "lm" and not cfg.data.pack:
        # Fixed windows over one token stream, tokenized once and cached on disk.
        return data.make_lm_iterator(cfg, session.tokenizer, split, cfg.train.batch_size, **kw)
    if records is None:
        records = data.load_records(cfg.data, split, cfg.task)
    return data.make_task_iterator(
        cfg, session.tokenizer, records, split, cfg.task, cfg.train.batch_size, **kw
    )


def _score_split(
    session: Any, params: Any, max_batches: int, records: Any = None
) -> dict[str, Any]:
    """Runs the sharded eval step over the eval split; returns sums and per-row outputs."""
    cfg, cs = session.cfg, session.steps
    totals = dict.fromkeys(("ce_sum", "correct_sum", "weight_sum", "count_sum"), 0.0)
    rows: dict[str, list] = {"predictions": [], "labels": [], "row_ce": [], "row_weight": []}
    batches = batch_iterator(session, cfg.data.eval_split, train=False, records=records)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(cs.eval(params, sharding.make_global_batch(batch, cs.mesh, cs.rules)))
        for k in totals:
            totals[k] += float(out[k])
        for k in rows:
            if k in out:
                rows[k].append(np.asarray(out[k]))
    if totals["count_sum"] == 0:
        raise UserError(
            f"eval split '{cfg.data.eval_split}' produced nothing to score; use a larger "
            "corpus or a smaller data.seq_len / train.batch_size"
        )
    return {"totals": totals, **{k: np.concatenate(v) if v else None for k, v in rows.items()}}


def _classify_metrics(session: Any, scored: dict) -> tuple[dict, dict]:
    cfg = session.cfg
    keep = scored["labels"] >= 0  # padding rows of the last batch
    preds, labels = scored["predictions"][keep], scored["labels"][keep]
    n_cls = cfg.model.num_classes
    f1 = metrics.f1_scores(preds, labels, n_cls)
    majority = int(np.argmax(np.bincount(session.train_labels, minlength=n_cls)))
    base = np.full_like(labels, majority)
    names = session.label_names or [str(c) for c in range(n_cls)]
    result = {
        "accuracy": metrics.accuracy(preds, labels),
        "macro_f1": f1["macro_f1"],
        "micro_f1": f1["micro_f1"],
        "majority_accuracy": metrics.accuracy(base, labels),
        "majority_macro_f1": metrics.f1_scores(base, labels, n_cls)["macro_f1"],
        "examples": int(len(labels)),
    }
    details = {
        "report": metrics.classification_report(preds, labels, names),
        "confusion_matrix": metrics.confusion_matrix(preds, labels, n_cls).tolist(),
        "majority_class": names[majority],
    }
    return result, {"details": details, "outputs": {"predictions": preds, "labels": labels}}


def seq2seq_examples(cfg: Any, tokenizer: Any, split: str, limit: int = 0, records: Any = None):
    """The prompts ([BOS] + source + SEP) and raw reference texts of a seq2seq split.

    Sources longer than the task's limits are truncated exactly as in training.
    `records` replaces the split's own records (the input filter's accepted ones).

    Returns:
      ``(prompts, references, copies)``; ``copies`` is the trivial system a model must
      beat: the source itself (translate) or the last turn echoed back (dialogue).
    """
    if records is None:
        records = data.load_records(cfg.data, split, cfg.task)
    n = len(records) if not limit else min(limit, len(records))
    recs = [records[i] for i in range(n)]
    examples = format_records(
        cfg.task, recs, tokenizer, history_turns=cfg.data.history_turns, indices=range(n)
    )
    limits = LengthLimits.from_config(cfg.data, cfg.task)
    limits = LengthLimits(limits.seq_len, limits.max_source, limits.max_target, "truncate")
    ref_key = "target" if cfg.task == "translate" else "response"
    prompts, refs, copies = [], [], []
    for rec, ex in zip(recs, examples, strict=True):
        (fitted,), _, _ = fit_length(cfg.task, ex, limits)
        prompts.append([tokenizer.bos_id, *fitted.prefix])
        refs.append(rec[ref_key])
        copies.append(rec["source"] if cfg.task == "translate" else rec["history"][-1])
    return prompts, refs, copies


def _target_tokens(cfg: Any, tokenizer: Any, split: str) -> np.ndarray:
    """Every scored target token of a split (what perplexity averages over)."""
    if cfg.task == "lm" and not cfg.data.pack:
        return np.asarray(data.split_tokens(cfg.data, tokenizer, split))
    records = data.load_records(cfg.data, split, cfg.task)
    recs = [records[i] for i in range(len(records))]
    examples = format_records(cfg.task, recs, tokenizer, history_turns=cfg.data.history_turns)
    return np.asarray([t for ex in examples for t in ex.target], np.int64)


def unigram_perplexity(cfg: Any, tokenizer: Any) -> float:
    """Perplexity of an add-one unigram model of the training targets on the eval targets.

    The baseline a sequence model must beat: it knows which tokens are frequent but
    nothing about context. Counts come from the training split, scored on the eval split
    (every target token, lengths not truncated).
    """
    vocab = cfg.model.vocab_size
    counts = np.bincount(_target_tokens(cfg, tokenizer, cfg.data.train_split), minlength=vocab)
    probs = (counts[:vocab] + 1.0) / (counts[:vocab].sum() + vocab)
    eval_tokens = _target_tokens(cfg, tokenizer, cfg.data.eval_split)
    return float(np.exp(-np.mean(np.log(probs[eval_tokens]))))


def _decode_all(session: Any, params: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Decodes every prompt in sharded global batches; returns the new tokens up to EOS."""
    cfg, cs, tok = session.cfg, session.steps, session.tokenizer
    e = cfg.eval
    width = max(len(p) for p in prompts)
    width = min(-(-width // 8) * 8, cfg.model.max_len - 1)  # one prompt shape: one compile
    max_new = e.max_new_tokens or LengthLimits.from_config(cfg.data, cfg.task).max_target
    max_new = min(max_new, cfg.model.max_len - width)
    ways = sharding.batch_ways(cs.mesh, cs.rules)
    global_batch = e.batch_size or cfg.train.batch_size
    global_batch = -(-global_batch // ways) * ways
    nproc, pid = jax.process_count(), jax.process_index()
    local = global_batch // nproc
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), global_batch):
        chunk = prompts[start : start + global_batch]
        chunk = chunk + [[tok.bos_id]] * (global_batch - len(chunk))  # padding rows
        chunk = chunk[pid * local : (pid + 1) * local]  # this host's rows
        arr = np.zeros((local, width), np.int32)
        lengths = np.zeros((local,), np.int32)
        for r, p in enumerate(chunk):
            p = p[-width:]
            arr[r, width - len(p) :] = p  # left padding: every row ends at the same column
            lengths[r] = len(p)
        new = decode_sharded(
            cfg,
            params,
            arr,
            lengths,
            mesh=cs.mesh,
            rules=cs.rules,
            max_new_tokens=max_new,
            eos_id=tok.eos_id,
        )
        for row in new[: len(prompts) - start]:
            row = row.tolist()
            outputs.append(row[: row.index(tok.eos_id)] if tok.eos_id in row else row)
    return outputs


def decode_sharded(
    cfg: Any,
    params: Any,
    prompt: np.ndarray,
    lengths: np.ndarray,
    *,
    mesh: Any,
    rules: Any,
    max_new_tokens: int,
    eos_id: int,
) -> np.ndarray:
    """Prefix-LM decoding of this host's rows as one global batch over the whole mesh.

    Args:
      cfg: The config (`model`, `precision`, `eval.strategy/beam_size/length_penalty`).
      params: Parameters, sharded over `mesh`.
      prompt: [b, P] this process's left-padded prompts (b = global batch / processes).
      lengths: [b] real prompt lengths.
      mesh: The mesh the batch is split over (batch axis rules as in training).
      rules: Logical-axis rules.
      max_new_tokens: Tokens to generate.
      eos_id: End of sequence.

    Returns:
      [global batch, max_new_tokens] new tokens of *every* host's rows (gathered).
    """
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from jaxllm.beam_search import _beam_search
    from jaxllm.decode import _generate, check_prompt
    from jaxllm.model import build_model
    from jaxllm.precision import get_policy

    e = cfg.eval
    _, cache_len = check_prompt(cfg.model, prompt[:1], max_new_tokens)
    model = build_model(cfg.model, get_policy(cfg.precision), decode=True)
    tokens = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, 2), np.asarray(prompt, np.int32)
    )
    lens = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, 1), np.asarray(lengths, np.int32)
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if e.strategy == "beam":
            out, _, _ = _beam_search(
                model,
                params,
                tokens,
                jnp.int32(max_new_tokens),
                jnp.int32(eos_id),
                jnp.float32(e.length_penalty),
                lens,
                jnp.bool_(True),
                cache_len=cache_len,
                beam_size=e.beam_size,
            )
            out = out[:, :max_new_tokens]
        else:
            out = _generate(
                model,
                params,
                tokens,
                jax.random.PRNGKey(e.seed),
                jnp.float32(1.0),
                jnp.float32(1.0),
                jnp.int32(eos_id),
                lens,
                jnp.bool_(True),
                max_new_tokens=max_new_tokens,
                cache_len=cache_len,
                strategy="greedy",
                top_k=0,
            )
    # Every host needs every hypothesis to score the corpus-level metrics.
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def _text_metrics(hyps: list[str], refs: list[str]) -> dict[str, float]:
    b, c, r = metrics.bleu(hyps, refs), metrics.chrf(hyps, refs), metrics.rouge(hyps, refs)
    return {
        "bleu": b["score"],
        "chrf": c["score"],
        "rouge1": r["rouge1"],
        "rouge2": r["rouge2"],
        "rouge_l": r["rougeL"],
        "exact_match": metrics.exact_match(hyps, refs),
    }


def text_metric(name: str, hyps: list[str], refs: list[str]) -> float:
    """One corpus-level text metric by name (for bootstrap resamples)."""
    if name == "bleu":
        return metrics.bleu(hyps, refs)["score"]
    if name == "chrf":
        return metrics.chrf(hyps, refs)["score"]
    if name == "exact_match":
        return metrics.exact_match(hyps, refs)
    return metrics.rouge(hyps, refs)[{"rouge1": "rouge1", "rouge2": "rouge2"}.get(name, "rougeL")]


def _split_metrics(session: Any, scored: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat metrics, extras) of one scored pass over the eval split."""
    t = scored["totals"]
    loss = t["ce_sum"] / t["weight_sum"] if t["weight_sum"] else float("nan")
    result: dict[str, Any] = {"loss": loss}
    if session.cfg.task == "classify":
        cls, extra = _classify_metrics(session, scored)
        result.update(cls)
        return result, extra
    result.update(
        perplexity=math.exp(min(loss, 50.0)),
        accuracy=t["correct_sum"] / t["count_sum"],
        tokens=t["count_sum"],
    )
    keep = scored["row_weight"] > 0
    outputs = {"row_ce": scored["row_ce"][keep], "row_weight": scored["row_weight"][keep]}
    return result, {"outputs": outputs}


def evaluate(
    session: Any,
    params: Any,
    max_batches: int | None = None,
    *,
    generate: bool = False,
    keep_outputs: bool = False,
) -> dict[str, Any]:
    """The task's metrics on `cfg.data.eval_split`.

    Args:
      session: A :class:`jaxllm.train.Session`.
      params: Parameters sharded as the session's state.
      max_batches: Loss batches to score (default `train.eval_batches`; 0 = all).
      generate: translate/dialogue: also decode the sources and score the text.
      keep_outputs: Return per-example outputs under ``"outputs"`` (for comparisons).

    Returns:
      Flat metrics (floats) plus, where they apply, ``"details"`` (per-class report,
      confusion matrix, BLEU signature, sample outputs) and ``"outputs"``.
    """
    cfg = session.cfg
    n = cfg.train.eval_batches if max_batches is None else max_batches
    inputs = robust_eval.eval_records(cfg, session.tokenizer)
    result, extra = _split_metrics(session, _score_split(session, params, n, inputs.records))
    if cfg.eval.char_noise:
        noisy_records = robust_eval.noised_records(cfg, inputs.records)
        noisy, _ = _split_metrics(session, _score_split(session, params, n, noisy_records))
        keys = ("loss", "accuracy", "macro_f1", "perplexity")
        result.update({f"noisy_{k}": noisy[k] for k in keys if k in noisy})
    flat, details = inputs.report()
    result.update(flat)
    if details:
        extra.setdefault("details", {}).update(details)
    if generate and cfg.task != "classify":
        result["baseline_perplexity"] = unigram_perplexity(cfg, session.tokenizer)
    if generate and cfg.task in SEQ2SEQ_TASKS:
        prompts, refs, copies = seq2seq_examples(
            cfg, session.tokenizer, cfg.data.eval_split, cfg.eval.max_examples, inputs.records
        )
        # Decoding applies the model itself: extras dropped, LoRA adapters merged.
        from jaxllm.step import model_params

        decoded = _decode_all(session, model_params(params), prompts)
        hyps = [session.tokenizer.decode(t) for t in decoded]
        result.update(_text_metrics(hyps, refs))
        result["examples"] = len(refs)
        baseline = _text_metrics(copies, refs)  # copy the source / echo the last turn
        result.update({f"baseline_{k}": baseline[k] for k in ("bleu", "chrf", "rouge_l")})
        extra.setdefault("details", {})
        extra["details"].update(
            bleu_signature=metrics.bleu(hyps, refs)["signature"],
            samples=[
                {"hypothesis": h, "reference": r} for h, r in zip(hyps[:5], refs[:5], strict=True)
            ],
        )
        extra["outputs"].update(hypotheses=hyps, references=refs)
    if "details" in extra:
        result["details"] = extra["details"]
    if keep_outputs:
        result["outputs"] = extra.get("outputs", {})
    return result
