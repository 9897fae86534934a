"""The dense attention core: causal query blocks == one XLA attention call."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import attention_mask
from jaxllm.attention_core import block_count, cached_attention, dense_attention
from jaxllm.config import ModelConfig, load_config
from jaxllm.errors import UserError
from jaxllm.model import build_model

# Compiler options of the tests' jitted inits: on CPU, LLVM's default level spends seconds
# optimising the threefry draws; level 1 draws the same bits (jaxllm.step.init_compiler_options).
from jaxllm.step import CPU_INIT_COMPILER_OPTIONS as INIT_OPTIONS  # noqa: E402


def _packed_batch(b=2, t=64):
    """Two packed documents and trailing padding per row, positions restarting per document."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row, cut in enumerate((37, 20)):
        seg[row, :cut], seg[row, cut : t - 5] = 1, 2
        pos[row, :cut], pos[row, cut : t - 5] = np.arange(cut), np.arange(t - 5 - cut)
    return jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_blocks_equal_xla_attention_on_packed_rows(heads, kv_heads):
    rng = np.random.default_rng(0)
    b, t, d = 2, 64, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kv_heads, d)), jnp.float32)
    pos, seg = _packed_batch(b, t)
    mask = attention_mask(pos, pos, q_segment_ids=seg, kv_segment_ids=seg)
    real = np.asarray(seg) > 0  # a padding query sees no key: its output is arbitrary

    def output_and_grads(fn):
        # One compile per variant: run eagerly, every slice and its gradient compiled on
        # its own (tens of seconds for these tiny shapes).
        def loss(q, k, v):
            return jnp.sum(jnp.where(real[..., None, None], fn(q, k, v), 0.0) ** 2)

        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)

    want, want_grads = output_and_grads(lambda *x: jax.nn.dot_product_attention(*x, mask=mask))
    for blocks in (1, 2, 4, 8):
        got, grads = output_and_grads(
            lambda *x, n=blocks: dense_attention(*x, mask, causal_blocks=n)
        )
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def test_block_count_falls_back_to_equal_blocks_of_16_or_more():
    assert block_count(256, 4) == 4
    assert block_count(128, 8) == 8
    assert block_count(48, 4) == 3  # 48 / 4 = 12 < 16 tokens per block
    assert block_count(7, 4) == 1
    assert block_count(100, 3) == 2  # 100 is not a multiple of 3
    assert block_count(64, 1) == 1


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 2, 16)), jnp.float32) for _ in range(3))
    pos = jnp.arange(32)[None]
    mask = attention_mask(pos, pos)
    # Jitted: eagerly, every slice and dot of the blocks compiles on its own.
    attend = jax.jit(lambda q, k, v: dense_attention(q, k, v, mask, causal_blocks=2))
    ref = attend(q, k, v)
    lo = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert lo.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(lo, np.float32), np.asarray(ref), atol=5e-2)


@pytest.mark.parametrize("flavour,prefix", [("gpt2", False), ("llama", False), ("llama", True)])
def test_model_logits_and_grads_equal_across_attention_impls(flavour, prefix):
    """causal_blocks=4, 2 and 1 (one XLA attention call): one model, same numbers.

    With a prefix-LM mask the blocks must switch themselves off (a prefix token sees
    later prefix tokens), so that case checks the guard as well.
    """
    t = 64
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, t)), jnp.int32)
    prefix_mask = jnp.arange(t)[None].repeat(2, 0) < jnp.asarray([[20], [41]]) if prefix else None
    base = dict(flavour=flavour, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=t)
    if flavour == "llama":
        base["n_kv_heads"] = 2
    outs = []
    params = None
    for variant in ({"causal_blocks": 4}, {"causal_blocks": 2}, {"causal_blocks": 1}):
        model = build_model(ModelConfig(**base, **variant))
        # Jitted: eagerly, every op of init, forward and gradient compiles on its own.
        if params is None:
            key = jax.random.PRNGKey(0)
            params = nn.unbox(
                jax.jit(model.init, compiler_options=INIT_OPTIONS)(key, tokens)["params"]
            )

        def loss(p, model=model):
            logits = model.apply({"params": p}, tokens, prefix_mask=prefix_mask)
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        outs.append((logits, grads))
    for logits, grads in outs[1:]:
        np.testing.assert_allclose(np.asarray(logits), np.asarray(outs[0][0]), atol=2e-5)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1]), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def test_causal_blocks_below_one_is_a_user_error():
    with pytest.raises(UserError, match="model.causal_blocks must be >= 1"):
        load_config("configs/lm_tiny.yaml", ["model.causal_blocks=0"])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_cached_attention_over_a_heads_major_cache_equals_xla_attention(heads, kv_heads):
    rng = np.random.default_rng(3)
    b, t, s, d = 3, 2, 24, 8  # two new tokens per row against a 24-slot cache
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv_heads, d)), jnp.float32)
    kv_pos = jnp.arange(s)[None].repeat(b, 0)
    q_pos = jnp.asarray([[10, 11], [17, 18], [22, 23]])
    mask = attention_mask(q_pos, kv_pos)
    # Jitted: eagerly, every reshape, dot and softmax op compiles on its own.
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    got = jax.jit(cached_attention)(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
