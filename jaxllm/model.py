"""The decoder Transformer (Flax Linen): GPT-2 and LLaMA flavours, configured, not subclassed.

- GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied input/output embeddings.
- LLaMA: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied head.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`layers`) and large activations are constrained to (`batch`, `length`, ...), so the
sharding rules in the config decide placement without this file knowing about devices.
Layers can be scanned (`model.scan_layers`, one compiled layer body: faster compiles
for deep models) and rematerialised (`model.remat`: none / full / save_dots).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.attention import NO_WINDOW, Attention, Projection, partitioned
from jaxllm.config import ModelConfig

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
}


def layer_windows(cfg: ModelConfig) -> list[int]:
    """Attention window of each layer: local, global, or alternating (local first)."""
    if cfg.attention == "global":
        return [NO_WINDOW] * cfg.n_layers
    if cfg.attention == "local":
        return [cfg.window] * cfg.n_layers
    return [cfg.window if i % 2 == 0 else NO_WINDOW for i in range(cfg.n_layers)]


class Mlp(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (LLaMA)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: Any = None

    def _dense(self, features, in_axis, out_axis, name):
        return Projection(
            features=(features,),
            in_axes=(in_axis,),
            out_axes=(out_axis,),
            use_bias=self.cfg.bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general_cls=self.dot_general_cls,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ff = self.cfg.ff_dim
        if self.cfg.flavour == "llama":
            gate = self._dense(ff, "embed", "mlp", "gate")(x)
            up = self._dense(ff, "embed", "mlp", "up")(x)
            h = nn.silu(gate) * up
        else:
            h = nn.gelu(self._dense(ff, "embed", "mlp", "fc")(x), approximate=True)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return self._dense(self.cfg.d_model, "mlp", "embed", "proj")(h)


def make_norm(cfg: ModelConfig, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (LLaMA); statistics are computed in fp32 by Flax."""
    if cfg.flavour == "llama":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=partitioned(nn.initializers.ones, "embed"),
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"),
        name=name,
    )


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    The call signature is scan-shaped, `(carry, layer_input) -> (carry, None)`, so the
    same module runs unrolled or under `nn.scan`; the per-layer input is its window.
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    deterministic: bool = True
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, carry, window):
        x, positions, segment_ids, prefix_mask = carry
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = make_norm(cfg, self.dtype, self.param_dtype, "attn_norm")(x)
        h = Attention(
            cfg, decode=self.decode, dot_general_cls=self.dot_general_cls, name="attn", **kw
        )(h, positions, segment_ids, prefix_mask, window)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        h = make_norm(cfg, self.dtype, self.param_dtype, "mlp_norm")(x)
        h = Mlp(cfg, dot_general_cls=self.dot_general_cls, name="mlp", **kw)(h)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, positions, segment_ids, prefix_mask), None


def pool_hidden(x: jax.Array, segment_ids: jax.Array | None, pooling: str) -> jax.Array:
    """One vector per row: the last real token's hidden state, or the mean over real tokens.

    Args:
      x: [B, T, D] final hidden states.
      segment_ids: [B, T], 0 on padding (None: every position is real).
      pooling: ``last`` or ``mean``.

    Returns:
      [B, D] pooled states (a row with no real token pools to position 0 / zeros).
    """
    real = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids > 0
    if pooling == "mean":
        w = real.astype(x.dtype)[..., None]
        return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
    # Rows are left-aligned, so the last real token sits at (number of real tokens - 1).
    last = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class Transformer(nn.Module):
    """Decoder-only Transformer language model.

    Attributes:
      cfg: the model config.
      dtype: compute dtype (see `jaxllm.precision`); params are `param_dtype`.
      decode: run with a KV cache (`cache` collection) for generation.
      dot_general_cls: optional dot_general factory injected into every dense layer
        (the fake-quant / int8 hook of the compression issue).
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    decode: bool = False
    dot_general_cls: Any = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        embed_perturbation: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Computes next-token logits.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] positions (default 0..T-1; required for packed or cached input).
          segment_ids: [B, T] packed-document ids, 0 = padding (None = one document).
          prefix_mask: [B, T] True on prefix tokens (prefix-LM; None = causal LM).
          deterministic: disables dropout.
          return_hidden: also return the final hidden states (distillation, heads).
          embed_perturbation: [B, T, d_model] added to the token embeddings
            (adversarial training, `jaxllm.adversarial`); None = none.

        Returns:
          logits [B, T, vocab] in `output_dtype` (and hidden [B, T, d_model] if asked);
          with `cfg.num_classes` > 0, class logits [B, num_classes] instead.
        """
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
            name="token_embed",
        )
        x = embed(tokens)
        if embed_perturbation is not None:
            x = x + embed_perturbation.astype(x.dtype)
        if cfg.flavour == "gpt2":
            x = x + nn.Embed(
                cfg.max_len,
                cfg.d_model,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                embedding_init=partitioned(nn.initializers.normal(0.01), "length", "embed"),
                name="pos_embed",
            )(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))

        block_kw = dict(
            cfg=cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            decode=self.decode,
            deterministic=deterministic,
            dot_general_cls=self.dot_general_cls,
        )
        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        carry = (x, positions, segment_ids, prefix_mask)
        windows = layer_windows(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block_cls,
                # calibration / intermediates: per-layer inputs and attention maps that
                # PTQ calibration and distillation read back.
                variable_axes={"params": 0, "cache": 0, "calibration": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=0,
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, _ = stack(**block_kw, name="layers")(carry, jnp.asarray(windows, jnp.int32))
        else:
            for i, window in enumerate(windows):
                carry, _ = block_cls(**block_kw, name=f"layer_{i}")(carry, window)
        x = make_norm(cfg, self.dtype, self.param_dtype, "final_norm")(carry[0])

        if cfg.num_classes:
            # A classifier replaces the LM head (as Hugging Face's *ForSequenceClassification):
            # the backbone is shared with the LM, so `init_from` an LM checkpoint loads it all.
            pooled = pool_hidden(x, segment_ids, cfg.pooling)
            logits = Projection(
                features=(cfg.num_classes,),
                in_axes=("embed",),
                out_axes=(None,),
                use_bias=True,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="cls_head",
            )(pooled)
            logits = logits.astype(self.output_dtype)
            return (logits, x) if return_hidden else logits
        if cfg.tied:
            logits = embed.attend(x)
        else:
            logits = Projection(
                features=(cfg.vocab_size,),
                in_axes=("embed",),
                out_axes=("vocab",),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        logits = logits.astype(self.output_dtype)
        return (logits, x) if return_hidden else logits


def build_model(cfg: ModelConfig, policy: Any = None, decode: bool = False, **kw) -> Transformer:
    """Creates the Transformer with the dtypes of a precision `policy` (default fp32)."""
    if policy is not None:
        kw.update(
            dtype=policy.compute_dtype,
            param_dtype=policy.param_dtype,
            output_dtype=policy.output_dtype,
        )
    if "dot_general_cls" not in kw:
        # model.quant: fake-quant (QAT) or integer kernels (a compressed model).
        from jaxllm.compress.qmodel import dot_general_for

        kw["dot_general_cls"] = dot_general_for(cfg)
    return Transformer(cfg, decode=decode, **kw)
