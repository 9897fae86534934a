"""Tasks: batch format and loss. This issue has `lm`; classify/translate/dialogue follow.

An LM batch is a dict of [B, T] arrays: `inputs` (token ids), `targets` (the next
token), `weights` (1.0 where the target counts) and optionally `positions`,
`segment_ids` (packed documents) and `prefix_mask` (prefix-LM). Losses return *sums*
and the weight total, not means, so gradient accumulation and sharding can divide by
the global token count once and stay exactly equal to the unsplit batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MODEL_INPUT_KEYS = ("positions", "segment_ids", "prefix_mask")


def model_kwargs(batch: dict) -> dict:
    """The optional batch fields the model takes as keyword arguments."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def lm_loss_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """Token-weighted next-token cross-entropy, as sums over the batch.

    Args:
      logits: [B, T, V] float logits (fp32 under every precision policy).
      targets: [B, T] int next tokens.
      weights: [B, T] float, 0 where a position does not count (padding, prefix).
      z_loss: coefficient of the PaLM auxiliary loss z_loss * log(Z)^2 (0 = off).

    Returns:
      dict with `loss_sum` (cross-entropy + z-loss), `ce_sum` (cross-entropy only),
      `correct_sum` (argmax hits) and `weight_sum`.
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = ce
    if z_loss:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        loss = loss + z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "ce_sum": jnp.sum(ce * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }
