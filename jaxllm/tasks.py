"""Tasks: what a batch holds and how it is scored (lm, classify, translate, dialogue).

One decoder serves every task. A batch is a dict of [B, T] arrays: ``inputs`` (token
ids), ``targets`` (the next token), ``weights`` (1.0 where the target counts) and
optionally ``positions``, ``segment_ids`` (packed examples, 0 = padding) and
``prefix_mask`` (prefix-LM); classify batches add ``label`` [B] (-1 on padding rows).

- ``lm``: next-token cross-entropy over every token.
- ``translate`` / ``dialogue`` (and summarisation, which is ``translate`` with a
  document as the source): prefix-LM. The source (or the last N dialogue turns) is
  the prefix, attended bidirectionally; the loss counts target tokens only (the
  data pipeline puts weight 0 on the prefix).
- ``classify``: the model's classification head reads the pooled example; the loss
  is cross-entropy with optional label smoothing, class weights and focal loss.

Losses return *sums* (and the normaliser), not means, so gradient accumulation and
sharding divide by the global total once and stay exactly equal to the unsplit batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import UserError

TASKS = ("lm", "classify", "translate", "dialogue")
SEQ2SEQ_TASKS = ("translate", "dialogue")
MODEL_INPUT_KEYS = ("positions", "segment_ids", "prefix_mask")
# Every loss returns these sums; the step adds them over micro-batches and shards.
SUM_KEYS = ("loss_sum", "ce_sum", "correct_sum", "weight_sum", "count_sum")


def model_kwargs(batch: dict) -> dict:
    """The optional batch fields the model takes as keyword arguments."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy against a smoothed one-hot target, per position.

    The target puts ``1 - label_smoothing`` on the label and spreads ``label_smoothing``
    uniformly over all classes (Szegedy et al. 2016; the convention of
    ``optax.smooth_labels`` and PyTorch's ``label_smoothing``).

    Args:
      logits: [..., C] float logits.
      labels: [...] int labels (any value where the weight is 0).
      label_smoothing: In [0, 1).

    Returns:
      [...] float32 losses.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # The label's logit as a masked sum rather than a gather: the gather's gradient is a
    # scatter into a zeroed [B, T, V] array, which on XLA:CPU cost more than the whole
    # softmax (BENCHMARKS.md, "Where the time goes"); this gradient is one fused select.
    classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
    nll = log_z - picked  # out-of-range labels pick nothing; their weight must be 0
    if not label_smoothing:
        return nll
    # -mean(log_softmax) = log Z - mean(logits)
    return (1.0 - label_smoothing) * nll + label_smoothing * (log_z - jnp.mean(logits, axis=-1))


def lm_loss_sums(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """Token-weighted next-token cross-entropy, as sums over the batch.

    Args:
      logits: [B, T, V] float logits (fp32 under every precision policy).
      targets: [B, T] int next tokens.
      weights: [B, T] float, 0 where a position does not count (padding, prefix).
      z_loss: coefficient of the PaLM auxiliary loss z_loss * log(Z)^2 (0 = off).
      label_smoothing: smoothing of the training loss (``ce_sum`` stays unsmoothed).

    Returns:
      dict with `loss_sum` (training loss), `ce_sum` (plain cross-entropy),
      `correct_sum` (argmax hits), `weight_sum` and `count_sum` (both the token count).
    """
    logits = logits.astype(jnp.float32)
    ce = smoothed_cross_entropy(logits, targets)
    loss = smoothed_cross_entropy(logits, targets, label_smoothing) if label_smoothing else ce
    if z_loss:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        loss = loss + z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "ce_sum": jnp.sum(ce * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
        "count_sum": jnp.sum(weights),
    }


def classify_loss_sums(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Class-weighted (focal, smoothed) cross-entropy of one label per row, as sums.

    Each row counts with the weight of its label (``class_weights[label]``, 1 without
    weights; 0 for padding rows whose label is -1), and the mean is the weighted mean,
    as in PyTorch's ``CrossEntropyLoss(weight=...)``. The focal loss (Lin et al. 2017)
    multiplies each row's loss by ``(1 - p_label) ** focal_gamma``.

    Args:
      logits: [B, C] class logits.
      labels: [B] int labels, -1 on padding rows.
      class_weights: [C] non-negative weights, or None.
      label_smoothing: In [0, 1).
      focal_gamma: Focal exponent (0 = plain cross-entropy).
      z_loss: log(Z)^2 coefficient.

    Returns:
      dict with `loss_sum`, `ce_sum` (weighted plain cross-entropy), `correct_sum`
      (correct rows, unweighted), `weight_sum` (the loss normaliser) and `count_sum`
      (real rows).
    """
    logits = logits.astype(jnp.float32)
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    row_w = valid.astype(jnp.float32)
    if class_weights is not None:
        row_w = row_w * jnp.asarray(class_weights, jnp.float32)[safe]
    ce = smoothed_cross_entropy(logits, safe)
    loss = smoothed_cross_entropy(logits, safe, label_smoothing) if label_smoothing else ce
    if focal_gamma:
        p = jnp.exp(-ce)  # probability of the label
        loss = loss * jnp.power(jnp.maximum(1.0 - p, 0.0), focal_gamma)
    if z_loss:
        loss = loss + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return {
        "loss_sum": jnp.sum(loss * row_w),
        "ce_sum": jnp.sum(ce * row_w),
        "correct_sum": jnp.sum(correct.astype(jnp.float32)),
        "weight_sum": jnp.sum(row_w),
        "count_sum": jnp.sum(valid.astype(jnp.float32)),
    }


def total_weight(task: str, batch: dict, class_weights: Any = None) -> jax.Array:
    """The global loss normaliser of a batch (what `weight_sum` adds up to)."""
    if task != "classify":
        return jnp.sum(batch["weights"])
    valid = batch["label"] >= 0
    if class_weights is None:
        return jnp.sum(valid.astype(jnp.float32))
    w = jnp.asarray(class_weights, jnp.float32)[jnp.where(valid, batch["label"], 0)]
    return jnp.sum(w * valid)


def loss_sums(task: str, logits: jax.Array, batch: dict, train_cfg: Any, class_weights=None):
    """The task's loss sums for model outputs `logits` on `batch` (training settings)."""
    if task == "classify":
        return classify_loss_sums(
            logits,
            batch["label"],
            class_weights,
            train_cfg.label_smoothing,
            train_cfg.focal_gamma,
            train_cfg.z_loss,
        )
    return lm_loss_sums(
        logits, batch["targets"], batch["weights"], train_cfg.z_loss, train_cfg.label_smoothing
    )


def eval_sums(task: str, logits: jax.Array, batch: dict, class_weights=None) -> dict:
    """Eval-time sums (no smoothing, focal or z-loss); classify adds per-row predictions."""
    if task != "classify":
        out = lm_loss_sums(logits, batch["targets"], batch["weights"])
        # Per-row sums: the resampling unit of a paired bootstrap on perplexity.
        ce = smoothed_cross_entropy(logits, batch["targets"])
        out["row_ce"] = jnp.sum(ce * batch["weights"], axis=1)
        out["row_weight"] = jnp.sum(batch["weights"], axis=1)
        return out
    out = classify_loss_sums(logits, batch["label"], class_weights)
    out["predictions"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out["labels"] = batch["label"]
    return out


def resolve_class_weights(spec: Any, labels: np.ndarray | None, num_classes: int):
    """Class weights from `train.class_weights`: None, a list, or "balanced".

    "balanced" is ``n / (C * count_c)`` over the training labels (scikit-learn's
    ``class_weight="balanced"``); a class absent from the training split gets weight 0.

    Args:
      spec: ``"none"``, ``"balanced"`` or a list of `num_classes` floats.
      labels: The training split's labels (needed for ``balanced``).
      num_classes: C.

    Returns:
      A float32 numpy array [C], or None for ``"none"``.
    """
    if isinstance(spec, list | tuple):
        return np.asarray(spec, np.float32)
    if spec in (None, "none"):
        return None
    if spec != "balanced":
        raise UserError(f"train.class_weights is {spec!r}; use none, balanced or a list")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)
