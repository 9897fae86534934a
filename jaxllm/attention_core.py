"""The dense attention core: softmax(q k^T / sqrt(d) + mask) v, heads-major, causal blocks.

`jax.nn.dot_product_attention` (XLA implementation) contracts `[B, T, N, H]` operands
directly and takes the mask as a `[B, 1, T, S]` boolean. On XLA:CPU that lowers to batched
dots whose operands need layout copies on every call, forward and backward; measured at
the gpt15m shapes of `benchmarks/train_throughput.py` (16 x 256 tokens, 6 heads of 64),
its forward + backward took about 1.8x as long as the same maths written here (see
BENCHMARKS.md, "Where the time goes"). This module:

- moves heads in front of the sequence once (`[B, N, T, H]`), so both dots are plain
  batched matmuls over `B x N`;
- groups query heads over their key/value head for grouped-query attention instead of
  repeating keys and values;
- takes logits and the softmax in fp32 (as the XLA implementation does) and the
  probabilities back to the value dtype for the second dot;
- with `causal_blocks=n > 1`, splits the queries into n blocks and gives block i only the
  keys of blocks 0..i. Every key after the last query of a block is masked for a causal
  sequence, so the skipped scores are exactly the ones the mask would zero: the result is
  the same and the score/value work drops to (n + 1) / (2 n) of dense (5/8 for n = 4).

The block skip relies on one property of the mask: a query never sees a key *later in the
array* than itself. Every batch jaxllm builds for causal training has it (positions rise
within a sequence or packed segment; other segments and padding are masked). Prefix-LM
batches do not (a prefix token sees later prefix tokens), and a KV cache is not a causal
array either, so callers pass `causal_blocks=1` for those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_count(length: int, requested: int) -> int:
    """The number of query blocks actually used for a sequence of `length`.

    Falls back to fewer blocks (down to 1, plain dense) when `length` does not split
    into `requested` equal blocks of at least 16 tokens: ragged blocks would give XLA
    one more shape to compile, and tiny ones cost more in per-dot overhead than they
    save.
    """
    n = max(1, requested)
    while n > 1 and (length % n or length // n < 16):
        n -= 1
    return n


def _scores_and_values(q, k, v, mask, scale):
    """One block: q [B, K, G, Tq, H], k/v [B, K, S, H], mask [B, 1|K*G, Tq, S]."""
    b, kvh, g, tq, _ = q.shape
    logits = jnp.einsum("bkgqh,bksh->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    # [B, 1, Tq, S] broadcasts over every head; a per-head [B, N, Tq, S] splits as N = K x G.
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kvh, g, tq, -1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bksh->bkgqh", probs, v, preferred_element_type=jnp.float32)


def dense_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal_blocks: int = 1
) -> jax.Array:
    """Masked softmax attention, numerically the XLA `dot_product_attention`.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys and values, K dividing N (grouped-query when K < N).
      mask: [B, 1 or N, T, S] bool, True where a query may see a key.
      causal_blocks: query blocks for the causal skip (1 = compute every score). Only
        valid when no query sees a key later in the array than itself and T == S.

    Returns:
      [B, T, N, H] attention output in q's dtype.
    """
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = n // kvh
    scale = 1.0 / jnp.sqrt(jnp.float32(h))
    # Heads-major once, here; the dots below then need no per-call layout copies.
    qh = q.reshape(b, t, kvh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kh = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    vh = v.transpose(0, 2, 1, 3)
    blocks = block_count(t, causal_blocks) if t == s else 1
    if blocks == 1:
        out = _scores_and_values(qh, kh, vh, mask, scale)
    else:
        size = t // blocks
        parts = []
        for i in range(blocks):
            q_slice = slice(i * size, (i + 1) * size)
            seen = (i + 1) * size  # keys after the block's last query are all masked
            parts.append(
                _scores_and_values(
                    qh[:, :, :, q_slice],
                    kh[:, :, :seen],
                    vh[:, :, :seen],
                    mask[:, :, q_slice, :seen],
                    scale,
                )
            )
        out = jnp.concatenate(parts, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
