"""Attention building blocks: the one mask function, rotary embeddings, the attention layer.

Every attention pattern jaxllm supports is a boolean mask built by
`attention_mask` from token *positions* (not array indices), so the same function
serves full-sequence training and KV-cache decoding, where queries sit at the end
of a longer cache:

- causal:          key position <= query position
- sliding window:  query position - key position < window
- prefix-LM:       keys flagged as prefix are visible to every query of the same
                   segment (bidirectional over the source, causal over the target)
- packed segments: queries only see keys with the same non-zero segment id
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import attention_core
from jaxllm.config import ModelConfig

# A window this large never masks anything: used for "global" layers so that local
# and global layers share one code path (and one scanned layer body).
NO_WINDOW = 2**30


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_prefix: jax.Array | None = None,
    window: int | jax.Array = NO_WINDOW,
) -> jax.Array:
    """Boolean attention mask, True where a query may attend to a key.

    Args:
      q_positions: [B, Tq] int positions of the queries.
      kv_positions: [B, Tk] int positions of the keys.
      q_segment_ids: optional [B, Tq] packed-sequence ids (0 = padding).
      kv_segment_ids: optional [B, Tk] ids for the keys.
      kv_prefix: optional [B, Tk] bool, True on prefix (source) tokens that every
        query of the same segment may see (prefix-LM).
      window: sliding-window size; `NO_WINDOW` for global attention. May be traced.

    Returns:
      [B, 1, Tq, Tk] bool mask (the 1 broadcasts over heads).
    """
    q = q_positions[:, :, None]
    k = kv_positions[:, None, :]
    allowed = (k <= q) & (q - k < window)
    if kv_prefix is not None:
        allowed = allowed | kv_prefix[:, None, :]
    if q_segment_ids is not None and kv_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        allowed = allowed & same & (kv_segment_ids[:, None, :] != 0)
    return allowed[:, None, :, :]


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies [dim/2], with `cfg.rope_scaling` applied.

    The scaling rules are those of Hugging Face `modeling_rope_utils` ("linear": every
    frequency divided by the factor; "llama3": wavelengths above the original context
    divided by the factor, those below ``original / high_freq_factor`` kept, a smooth
    blend between), so converted checkpoints give the same angles.
    """
    dim = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        old = cfg.rope_original_max_len
        low, high = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * jnp.pi / inv_freq
        scaled = jnp.where(wavelen > low, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high) & (wavelen <= low)
        return jnp.where(medium, blended, scaled)
    return inv_freq


def rope_frequencies(
    positions: jax.Array, dim: int, theta: float, inv_freq: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, dim] in the Hugging Face `rotate_half` layout (for conversion)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, heads, dim] by the position angles (computed in fp32)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def partitioned(init: Any, *axes: str | None) -> Any:
    """An initializer that records logical axis names on the parameter."""
    return nn.with_logical_partitioning(init, axes)


class Projection(nn.Module):
    """A dense layer over the trailing `len(in_axes)` dims with a full-rank kernel.

    Unlike `nn.DenseGeneral`, the kernel is created in its final shape (e.g.
    [embed, heads, kv]) so each of its dimensions carries its own logical axis name.

    Attributes:
      features: output shape appended after the batch dims.
      in_axes / out_axes: logical names of the contracted and produced dims.
      dot_general_cls: optional Flax dot_general factory (fake-quant / int8 hook).
    """

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        if self.is_mutable_collection("calibration") and not self.is_initializing():
            # PTQ calibration reads every projection's input (static activation scales).
            self.sow("calibration", "inputs", x)
        hook = self.dot_general_cls() if self.dot_general_cls else None
        if getattr(hook, "stored_kernel", False):
            # quant=int: the kernel parameter is {"qvalue": int8, "scale"} (compress.qmodel).
            y = hook.apply(self, x, n_in, self.features, self.in_axes, self.out_axes)
            return self._add_bias(y)
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(0.02), *self.in_axes, *self.out_axes),
            (*x.shape[-n_in:], *self.features),
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        dot_general = hook or jax.lax.dot_general
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return self._add_bias(dot_general(x, kernel, (contract, ((), ()))))

    def _add_bias(self, y: jax.Array) -> jax.Array:
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros, *self.out_axes),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention probabilities [B, heads, Tq, Tk] in fp32 (kv heads repeated for GQA)."""
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = jnp.where(mask, logits / jnp.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def _self_mask(positions, segment_ids, prefix_mask, window):
    """The mask of a sequence attending to itself (full forward, or cache allocation)."""
    return attention_mask(
        positions,
        positions,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        kv_prefix=prefix_mask,
        window=window,
    )


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with an optional KV cache.

    Attributes:
      cfg: model config (heads, kv heads, head dim, RoPE, bias).
      dtype: compute dtype; parameters stay in `param_dtype`.
      decode: if True, keys/values are appended to a `cache` collection.
      dot_general_cls: optional Flax dot_general factory (fake-quant hook).
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    dot_general_cls: Any = None

    def _dense(self, features, in_axes, out_axes, name, bias):
        return Projection(
            features=features,
            in_axes=in_axes,
            out_axes=out_axes,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general_cls=self.dot_general_cls,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        prefix_mask: jax.Array | None,
        window: int | jax.Array,
    ) -> jax.Array:
        cfg = self.cfg
        h, kvh, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.qkv_biased
        q = self._dense((h, d), ("embed",), ("heads", "kv"), "query", qkv_bias)(x)
        k = self._dense((kvh, d), ("embed",), ("heads", "kv"), "key", qkv_bias)(x)
        v = self._dense((kvh, d), ("embed",), ("heads", "kv"), "value", qkv_bias)(x)
        if cfg.flavour == "llama":
            cos, sin = rope_frequencies(positions, d, cfg.rope_theta, rope_inv_freq(cfg))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

        if self.decode:
            k, v, mask = self._update_cache(k, v, positions, segment_ids, prefix_mask, window)
        else:
            mask = _self_mask(positions, segment_ids, prefix_mask, window)
        if (
            self.is_mutable_collection("intermediates")
            and not self.decode
            and not self.is_initializing()
        ):
            # Attention-map transfer (distillation) reads the probabilities back.
            self.sow("intermediates", "attention_probs", attention_probs(q, k, mask))
        ring = None
        if cfg.attention_impl == "ring" and not self.decode:
            # Imported here: ring_attention builds its masks with this module's function.
            from jaxllm import ring_attention

            # None off a mesh or on a 1-way ring (e.g. one-device eval): dense, same numbers.
            ring = ring_attention.ring_spec(h, kvh)
        if ring is not None:
            out = ring_attention.ring_attention(
                q, k, v, positions, segment_ids, prefix_mask, window, spec=ring
            )
        else:
            out = self._core(q, k, v, mask, causal=prefix_mask is None, cached=self.decode)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return self._dense((cfg.d_model,), ("heads", "kv"), ("embed",), "out", cfg.out_biased)(out)

    def _core(self, q, k, v, mask, causal: bool, cached: bool) -> jax.Array:
        """The dense attention core (`model.attention_impl=dense`, and decoding).

        With `cached`, k and v are the heads-major cache `[B, K, S, H]`.
        """
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no fp16 x fp16 -> fp32 dot; fp16 exists for GPUs without bf16,
            # so on CPU (tests, laptops) the attention core runs in fp32.
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        if cached:
            return attention_core.cached_attention(q, k, v, mask).astype(dtype)
        # Prefix-LM prefixes see later prefix keys, and a KV cache is not a causal array:
        # only a causal full forward may skip the key blocks after each query block.
        blocks = self.cfg.causal_blocks if causal else 1
        return attention_core.dense_attention(q, k, v, mask, causal_blocks=blocks).astype(dtype)

    def _update_cache(self, k, v, positions, segment_ids, prefix_mask, window):
        """Writes new keys/values at `cache_index`; returns the whole cache and its mask.

        Besides keys and values, every slot stores the token's position, segment id and
        prefix flag, so the mask is built from true positions exactly as in a full forward
        pass. That is what lets rows of one batch hold prompts of different lengths:
        left padding is written with segment 0 and never seen, and each row's real tokens
        carry their own positions (starting at 0) whatever slot they occupy.

        Args:
          k, v: [B, T, kv_heads, dim] new keys and values.
          positions: [B, T] positions of the new tokens.
          segment_ids: [B, T] ids of the new tokens (0 = padding); None = all 1.
          prefix_mask: [B, T] prefix flags of the new tokens; None = not prefix.
          window: sliding-window size of this layer.

        Returns:
          The cached keys and values [B, kv_heads, L, dim] and the mask [B, 1, T, L].
        """
        batch, length = k.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        # Keys and values are cached heads-major, [B, K, L, H]: see cached_attention.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_prefix = self.variable(
            "cache", "cached_prefix", jnp.zeros, (batch, k.shape[2]), jnp.bool_
        )
        # Segment 0 marks both padding and slots not written yet: both stay masked, since
        # with true positions an unwritten slot (position 0) would pass the causal test.
        cached_seg = self.variable(
            "cache", "cached_segment", jnp.zeros, (batch, k.shape[2]), jnp.int32
        )
        cached_pos = self.variable(
            "cache", "cached_position", jnp.zeros, (batch, k.shape[2]), jnp.int32
        )
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:  # model.init(decode=True) only allocates the cache
            return k, v, _self_mask(positions, segment_ids, prefix_mask, window)
        i = index.value

        def write(cache, new, axis=1):
            start = tuple(i if a == axis else 0 for a in range(new.ndim))
            return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)

        cached_k.value = write(cached_k.value, k, axis=2)
        cached_v.value = write(cached_v.value, v, axis=2)
        cached_seg.value = write(cached_seg.value, segment_ids)
        cached_pos.value = write(cached_pos.value, positions)
        if prefix_mask is not None:
            cached_prefix.value = write(cached_prefix.value, prefix_mask)
        index.value = i + length
        mask = attention_mask(
            positions,
            cached_pos.value,
            q_segment_ids=segment_ids,
            kv_segment_ids=cached_seg.value,
            kv_prefix=cached_prefix.value,
            window=window,
        )
        return cached_k.value, cached_v.value, mask
