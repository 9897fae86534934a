"""Ring (context-parallel) attention: the sequence split over a mesh axis, K/V passed around.

Dense attention holds [B, heads, T, T] scores per device, so the longest sequence a
device can train on is set by T^2. Here each of the n devices of the *ring axis*
holds T/n queries and T/n keys/values. In n steps every device scores its queries
against the K/V block it holds, folds the result into a flash-style online-softmax
accumulator (running max, running sum, running output) and passes the block to
its neighbour with `lax.ppermute`; after n steps every query has seen every key.
Per device the scores are [B, heads, T/n, T/n] at a time, and each step is
rematerialised in the backward pass (`jax.checkpoint`), so the saved residuals are
O(T/n * heads * dim) per step rather than the scores.

The mask is built per block by `jaxllm.attention.attention_mask` from the true
positions, segment ids and prefix flags that travel around the ring with the K/V,
so causal, sliding-window, packed (segment ids) and prefix-LM attention all work
unchanged. Fully masked rows (padding) average every value, as the dense path does.

Which mesh axis is the ring: the one the logical `length` axis maps to in
`mesh.rules` (e.g. ``mesh.rules.length=fsdp``). This borrows an existing mesh axis
instead of adding a fourth (`context`) one: DESIGN.md's mesh stays (data, fsdp,
tensor), and sequence sharding is a rules-table decision like every other placement.

Not done: causal load balancing (zig-zag block order) and skipping blocks that are
entirely in the future; every device computes all n blocks. DP-SGD (`privacy.dp`) is
refused with ring attention: its per-example `vmap(spmd_axis_name=...)` around this
shard_map fails JAX 0.10.2's varying-axes check.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm.attention import NO_WINDOW, attention_mask

_MASKED = jnp.finfo(jnp.float32).min


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def ring_spec(n_heads: int, kv_heads: int) -> PartitionSpec | None:
    """The [B, T, heads, dim] spec of the ring under the current rules and mesh, or None.

    None means there is no ring to run on: no mesh in context, `length` maps to no
    mesh axis, or that axis has size 1. Heads stay split over their axis only when
    both the query and the key/value head counts divide by it (GQA groups must not
    straddle devices); otherwise the heads are gathered for the attention core.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch, length, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    ring = [a for a in _axes(length) if a in mesh.shape]
    if len(ring) != 1 or mesh.shape[ring[0]] == 1:
        return None
    head_ways = math.prod(mesh.shape[a] for a in _axes(heads) if a in mesh.shape)
    if n_heads % head_ways or kv_heads % head_ways:
        heads = None
    return PartitionSpec(batch, ring[0], heads, None)


def _block_update(acc, q, block, window, q_pos, q_seg):
    """Folds one K/V block into the online-softmax accumulator (flash attention's rule).

    Args:
      acc: (output [b, kvh, g, tq, d], running max [b, kvh, g, tq], running sum).
      q: [b, tq, kvh, g, d] scaled fp32 queries.
      block: (k, v [b, tk, kvh, d], positions, segment ids or None, prefix or None).
      window: sliding-window size.
      q_pos, q_seg: the queries' positions and segment ids (or None).
    """
    out, row_max, row_sum = acc
    k, v, k_pos, k_seg, k_prefix = block
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(jnp.float32))
    mask = attention_mask(
        q_pos,
        k_pos,
        q_segment_ids=q_seg,
        kv_segment_ids=k_seg,
        kv_prefix=k_prefix,
        window=window,
    )  # [b, 1, tq, tk]
    scores = jnp.where(mask[:, :, None], scores, _MASKED)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    correction = jnp.exp(row_max - new_max)
    row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
    out = out * correction[..., None] + jnp.einsum(
        "bhgqk,bkhd->bhgqd", probs, v.astype(jnp.float32)
    )
    return out, new_max, row_sum


def _local_ring(q, k, v, pos, seg, prefix, window, *, axis: str, has_seg: bool, has_prefix: bool):
    """One device's share: its T/n queries against all n K/V blocks (inside shard_map)."""
    n = jax.lax.axis_size(axis)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    # Scale the queries once (as dot_product_attention scales the logits by 1/sqrt(d)).
    qf = q.astype(jnp.float32).reshape(b, t, kvh, g, d) * (1.0 / math.sqrt(d))
    q_seg = seg if has_seg else None
    block = (k, v, pos, seg if has_seg else None, prefix if has_prefix else None)
    acc = (
        jnp.zeros((b, kvh, g, t, d), jnp.float32),
        jnp.full((b, kvh, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kvh, g, t), jnp.float32),
    )
    # Recompute each block's scores in the backward pass: residuals stay O(T/n * d).
    update = jax.checkpoint(_block_update)
    acc = update(acc, qf, block, window, pos, q_seg)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):
        acc, block = carry
        block = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), block)
        return (update(acc, qf, block, window, pos, q_seg), block), None

    (acc, _), _ = jax.lax.scan(step, (acc, block), None, length=n - 1)
    out, _, row_sum = acc
    out = out / row_sum[..., None]  # [b, kvh, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    prefix_mask: jax.Array | None = None,
    window: int | jax.Array = NO_WINDOW,
    *,
    spec: PartitionSpec,
) -> jax.Array:
    """Self-attention with the sequence split over the ring axis named in `spec`.

    Must run under `jax.set_mesh`. Equals `jax.nn.dot_product_attention` with the mask
    `attention_mask(positions, positions, ...)` (the model's dense path).

    Args:
      q: [B, T, heads, dim] queries.
      k, v: [B, T, kv_heads, dim] keys and values (grouped-query when fewer heads).
      positions: [B, T] int positions.
      segment_ids: [B, T] packed-document ids, 0 = padding (None: one document).
      prefix_mask: [B, T] True on prefix tokens (None: causal LM).
      window: sliding-window size (`NO_WINDOW` = global); may be traced.
      spec: the [B, T, heads, dim] PartitionSpec from `ring_spec` (entry 1 = ring axis).

    Returns:
      [B, T, heads, dim] attention output in q's dtype.
    """
    axis = spec[1]
    rows = PartitionSpec(spec[0], axis)
    has_seg, has_prefix = segment_ids is not None, prefix_mask is not None
    seg = segment_ids if has_seg else jnp.zeros(positions.shape, jnp.int32)
    prefix = prefix_mask if has_prefix else jnp.zeros(positions.shape, bool)
    window = jnp.asarray(window, jnp.int32)

    def local(q, k, v, pos, seg, prefix, window):
        return _local_ring(
            q, k, v, pos, seg, prefix, window, axis=axis, has_seg=has_seg, has_prefix=has_prefix
        )

    return jax.shard_map(
        local,
        in_specs=(spec, spec, spec, rows, rows, rows, PartitionSpec()),
        out_specs=spec,
    )(q, k, v, positions, seg, prefix, window)
