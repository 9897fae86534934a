"""The dense attention core: `jax.nn.dot_product_attention` that skips masked key blocks.

A causal model's [T, T] score matrix is half masked, yet a single attention call computes
every score and then masks it. With `causal_blocks=n > 1` the queries are split into n
blocks and block i gets only the keys of blocks 0..i: every key after the last query of
a block is masked for a causal sequence, so the skipped scores are exactly the ones the
mask would zero. The result is the same and the score/value work drops to (n + 1) / (2 n)
of dense (5/8 for n = 4), as do the [T, S] temporaries the backward pass keeps. Each block
is an ordinary `jax.nn.dot_product_attention` call (XLA's implementation, fp32 softmax),
so TPU and GPU keep the lowering they already have.

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


def dense_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal_blocks: int = 1
) -> jax.Array:
    """Masked softmax attention: `jax.nn.dot_product_attention`, block by causal block.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys and values, K dividing N (grouped-query when K < N).
      mask: [B, 1 or N, T, S] bool, True where a query may see a key.
      causal_blocks: query blocks for the causal skip (1 = compute every score). Only
        valid when no query sees a key later in the array than itself and T == S.

    Returns:
      [B, T, N, H] attention output in q's dtype.
    """
    t, s = q.shape[1], k.shape[1]
    blocks = block_count(t, causal_blocks) if t == s else 1
    if blocks == 1:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    size = t // blocks
    parts = []
    for i in range(blocks):
        rows = slice(i * size, (i + 1) * size)
        seen = (i + 1) * size  # keys after the block's last query are all masked
        parts.append(
            jax.nn.dot_product_attention(
                q[:, rows], k[:, :seen], v[:, :seen], mask=mask[:, :, rows, :seen]
            )
        )
    return jnp.concatenate(parts, axis=1)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of new queries over a heads-major KV cache (decoding).

    The cache is stored `[B, K, S, H]` because the score and value dots batch over
    (B, K): in the `[B, S, K, H]` layout XLA:CPU copied every layer's whole cache into
    that order on every decode step, most of a step's time at 16 rows (BENCHMARKS.md).
    Queries are few (one per row per step), so regrouping them costs nothing.

    Args:
      q: [B, T, N, H] queries of the new tokens.
      k, v: [B, K, S, H] cached keys and values, K dividing N.
      mask: [B, 1 or N, T, S] bool.

    Returns:
      [B, T, N, H] attention output in q's dtype.
    """
    b, t, n, h = q.shape
    kvh = k.shape[1]
    g = n // kvh
    qh = q.reshape(b, t, kvh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    logits = jnp.einsum("bkgth,bksh->bkgts", qh, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(h))
    # [B, 1, T, S] broadcasts over every head; a per-head [B, N, T, S] splits as N = K x G.
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kvh, g, t, -1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
