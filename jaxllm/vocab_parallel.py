"""Vocab-parallel cross-entropy: the LM head and the loss fused in one `jax.shard_map`.

The plain loss (`jaxllm.tasks.lm_loss_sums`) receives the whole [B, T, V] logits from
the model and leaves it to the SPMD partitioner how `log_softmax`, the target gather
and the argmax run on vocab-sharded logits. Here each device multiplies the final
hidden states by *its own* vocab slice of the output projection, so only
[B_local, T, V / n] logits ever exist per device, and three scalar-per-token
collectives finish the job:

- log Z: local max -> `pmax` (stabiliser, no gradient), local sum of exp -> `psum`;
- the target logit: each shard contributes it if the target id falls in its slice,
  zero otherwise -> `psum`;
- the argmax (accuracy): local max and index -> the lowest global index among the
  shards holding the global max (`pmin`), which is `jnp.argmax`'s first-hit rule.

Each device also walks its tokens in chunks (`chunk_tokens`, default 1024), each
rematerialised in the backward pass, so only one chunk's [chunk, V / n] slice (and its
gradient) is live at a time: benchmarks/shard_map_memory.py measures the savings.

Label smoothing (needs the mean logit: `psum` of local sums) and z-loss (log Z^2) are
supported, so the training loss equals the plain one. Gradients come from JAX's
autodiff of the shard_map: the cotangent of the (tensor-replicated) hidden states is
summed over the vocab axis automatically.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm.errors import UserError


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def vocab_axis_size(mesh: Any, vocab_axes: tuple[str, ...]) -> int:
    """How many shards the vocab is split into on `mesh` (1 without a mesh)."""
    if mesh is None or mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in vocab_axes if a in mesh.shape)


def _local_sums(x, w, targets, *, vocab_axes, vocab_size, tied, z_loss, label_smoothing, dtype):
    """Per-token nll, training loss and hit of one device's vocab slice (inside shard_map)."""
    x = x.astype(dtype)
    w = w.astype(dtype)
    # Same contraction and dtypes as the model's head (Projection / Embed.attend), so the
    # logits equal the plain path's; the loss itself is fp32 like lm_loss_sums.
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    logits = jnp.einsum(spec, x, w).astype(jnp.float32)  # [b, t, V/n]
    shard_vocab = logits.shape[-1]
    offset = jax.lax.axis_index(vocab_axes) * shard_vocab

    # The max only stabilises exp(); log Z does not depend on it, so no gradient flows
    # (and pmax has no differentiation rule: the stop must come before it).
    local_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    m = jax.lax.pmax(local_max, vocab_axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), vocab_axes)
    log_z = m + jnp.log(sum_exp)

    safe = jnp.clip(targets, 0, vocab_size - 1)  # as smoothed_cross_entropy: padding ids
    local_t = safe - offset
    owns = (local_t >= 0) & (local_t < shard_vocab)
    picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, shard_vocab - 1)[..., None], axis=-1)[
        ..., 0
    ]
    target_logit = jax.lax.psum(jnp.where(owns, picked, 0.0), vocab_axes)
    nll = log_z - target_logit

    loss = nll
    if label_smoothing:
        mean_logit = jax.lax.psum(jnp.sum(logits, axis=-1), vocab_axes) / vocab_size
        loss = (1.0 - label_smoothing) * nll - label_smoothing * (mean_logit - log_z)
    if z_loss:
        loss = loss + z_loss * jnp.square(log_z)

    # argmax: first index of the global max, as jnp.argmax over the full vocab.
    local_arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) + offset
    candidate = jnp.where(local_max == m, local_arg, vocab_size)
    prediction = jax.lax.pmin(candidate, vocab_axes)
    correct = (prediction == targets).astype(jnp.float32)
    return nll, loss, correct


def _n_chunks(tokens: int, chunk_tokens: int) -> int:
    """How many equal chunks of at most ~`chunk_tokens` split `tokens` (1 = no chunking)."""
    if chunk_tokens <= 0 or tokens <= chunk_tokens:
        return 1
    least = -(-tokens // chunk_tokens)
    for n in range(least, 2 * least + 1):  # the smallest count >= least that divides
        if tokens % n == 0:
            return n
    return 1  # no even split near the target (an odd token count): one chunk


def vocab_parallel_lm_sums(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    tied: bool,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    dtype: Any = jnp.float32,
    vocab_axes: tuple[str, ...] | None = None,
    row_spec: PartitionSpec | None = None,
    chunk_tokens: int = 1024,
) -> dict[str, jax.Array]:
    """`tasks.lm_loss_sums` of ``head(hidden)`` without materialising the full logits.

    Must run under `jax.set_mesh` (the mesh names the vocab axis); the sharding rules
    in `nn.logical_axis_rules` give the default vocab and row placements.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm).
      head: the output projection, [D, V] (``lm_head/kernel``) or, when `tied`, the
        token embedding [V, D].
      targets: [B, T] int next tokens.
      weights: [B, T] float, 0 where a position does not count.
      tied: `head` is the [V, D] embedding table (GPT-2) rather than a [D, V] kernel.
      z_loss: coefficient of z_loss * log(Z)^2.
      label_smoothing: smoothing of the training loss (``ce_sum`` stays plain).
      dtype: compute dtype of the head matmul (the precision policy's).
      vocab_axes: mesh axes the vocab is split over (default: the `vocab` rule).
      row_spec: PartitionSpec of [B, T] arrays (default: the `batch`, `length` rules).
      chunk_tokens: each device scores its tokens in chunks of about this many (one
        chunk's logits live at a time); 0 = all at once.

    Returns:
      The same sums as `tasks.lm_loss_sums`: loss_sum, ce_sum, correct_sum,
      weight_sum, count_sum.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if vocab_axes is None:
        vocab_axes = _axes(nn.logical_to_mesh_axes(("vocab",))[0])
    if row_spec is None:
        row_spec = nn.logical_to_mesh_axes(("batch", "length"))
    vocab_axes = tuple(a for a in vocab_axes if a in mesh.shape)
    n = vocab_axis_size(mesh, vocab_axes)
    vocab_size = head.shape[0] if tied else head.shape[-1]
    if n <= 1:
        raise UserError(
            "train.loss_impl=vocab_parallel needs a vocab mesh axis of size > 1 "
            "(e.g. mesh.tensor=4 with mesh.rules.vocab=tensor); use train.loss_impl=plain"
        )
    if vocab_size % n:
        raise UserError(
            f"model.vocab_size={vocab_size} is not divisible by the {n} vocab shards; "
            f"use a vocab size that is a multiple of {n} or train.loss_impl=plain"
        )
    used = {a for entry in row_spec for a in _axes(entry)}
    if used & set(vocab_axes):
        raise UserError(
            f"the vocab axes {vocab_axes} also split the batch or length ({row_spec}); "
            "map mesh.rules.vocab to an axis the batch does not use"
        )
    row_spec = PartitionSpec(*tuple(row_spec)[:2])
    vocab_entry = vocab_axes if len(vocab_axes) > 1 else vocab_axes[0]
    head_spec = PartitionSpec(vocab_entry, None) if tied else PartitionSpec(None, vocab_entry)
    hidden_spec = PartitionSpec(*row_spec, None)

    def chunk_sums(x, w, t):
        return _local_sums(
            x,
            w,
            t,
            vocab_axes=vocab_axes,
            vocab_size=vocab_size,
            tied=tied,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            dtype=dtype,
        )

    def local(x, w, t):
        b, length, d = x.shape
        n_chunks = _n_chunks(b * length, chunk_tokens)
        if n_chunks == 1:
            return chunk_sums(x, w, t)
        # Token chunks, each rematerialised in the backward pass: one chunk's
        # [chunk_tokens, V/n] logits (and their gradient) are live at a time.
        xs = x.reshape(n_chunks, 1, -1, d)
        ts = t.reshape(n_chunks, 1, -1)
        step = jax.checkpoint(lambda xt: chunk_sums(xt[0], w, xt[1]))
        outs = jax.lax.map(step, (xs, ts))
        return tuple(o.reshape(b, length) for o in outs)

    nll, loss, correct = jax.shard_map(
        local,
        in_specs=(hidden_spec, head_spec, row_spec),
        out_specs=(row_spec, row_spec, row_spec),
    )(hidden, head, targets)
    return {
        "loss_sum": jnp.sum(loss * weights),
        "ce_sum": jnp.sum(nll * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
        "count_sum": jnp.sum(weights),
    }


def head_of(params: dict, tied: bool) -> jax.Array:
    """The LM head matrix in `params`: the tied embedding [V, D] or lm_head's kernel [D, V]."""
    leaf = params["token_embed"]["embedding"] if tied else params["lm_head"]["kernel"]
    if not hasattr(leaf, "shape") or leaf.ndim != 2:
        raise UserError(
            "train.loss_impl=vocab_parallel needs a plain float LM head matrix; "
            "use train.loss_impl=plain for this model"
        )
    return leaf
