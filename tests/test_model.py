"""Attention variants against a plain numpy reference; scan/remat/decode equivalences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import NO_WINDOW, Attention, attention_mask
from jaxllm.config import ModelConfig
from jaxllm.decode import filter_logits, generate
from jaxllm.model import build_model

# Compiler options of the tests' jitted inits: on CPU, LLVM's default level spends seconds
# optimising the threefry draws; level 1 draws the same bits (jaxllm.step.init_compiler_options).
from jaxllm.step import CPU_INIT_COMPILER_OPTIONS as INIT_OPTIONS  # noqa: E402


def _np_rope(x, positions, theta):
    """Rotates pairs (i, i + D/2) by pos * theta^(-2i/D), written out element by element."""
    b, t, h, d = x.shape
    out = x.copy()
    for bi in range(b):
        for ti in range(t):
            for i in range(d // 2):
                angle = positions[bi, ti] * theta ** (-2.0 * i / d)
                c, s = np.cos(angle), np.sin(angle)
                a, bb = x[bi, ti, :, i], x[bi, ti, :, i + d // 2]
                out[bi, ti, :, i] = a * c - bb * s
                out[bi, ti, :, i + d // 2] = bb * c + a * s
    return out


def _np_allowed(q, k, window, prefix, seg):
    """The attention rule for one (query, key) pair, spelled out."""
    if seg is not None and (seg[q] != seg[k] or seg[k] == 0):
        return False
    if prefix is not None and prefix[k]:
        return True
    return k <= q and q - k < window


def _np_attention(cfg, params, x, window=NO_WINDOW, prefix=None, seg=None):
    p = jax.tree.map(np.asarray, params)
    h, kvh, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    q = np.einsum("bte,ehd->bthd", x, p["query"]["kernel"])
    k = np.einsum("bte,ehd->bthd", x, p["key"]["kernel"])
    v = np.einsum("bte,ehd->bthd", x, p["value"]["kernel"])
    b, t = x.shape[:2]
    pos = np.tile(np.arange(t), (b, 1))
    if cfg.flavour == "llama":
        q, k = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // kvh)  # grouped-query: query head hi reads KV head kv
            for qi in range(t):
                allowed = [
                    _np_allowed(
                        qi,
                        ki,
                        window,
                        None if prefix is None else prefix[bi],
                        None if seg is None else seg[bi],
                    )
                    for ki in range(t)
                ]
                scores = np.array([q[bi, qi, hi] @ k[bi, ki, kv] for ki in range(t)]) / np.sqrt(d)
                scores = np.where(allowed, scores, -np.inf)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, qi, hi] = w @ v[bi, :, kv]
    return np.einsum("bthd,hde->bte", out, p["out"]["kernel"])


CASES = {
    "gqa_rope": dict(flavour="llama", n_kv_heads=2),
    "mha_gpt2": dict(flavour="gpt2"),
    "sliding_window": dict(flavour="llama", n_kv_heads=1, window=3),
    "prefix_lm": dict(flavour="llama", n_kv_heads=2, prefix=True),
    "packed_segments": dict(flavour="llama", n_kv_heads=2, segments=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_numpy_reference(name):
    case = dict(CASES[name])
    window = case.pop("window", NO_WINDOW)
    use_prefix, use_seg = case.pop("prefix", False), case.pop("segments", False)
    cfg = ModelConfig(d_model=16, n_heads=4, vocab_size=11, use_bias=False, **case)
    b, t = 2, 7
    x = np.random.RandomState(0).randn(b, t, 16).astype(np.float32)
    positions = np.tile(np.arange(t), (b, 1))
    prefix = np.array([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]], bool) if use_prefix else None
    seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2, 2]]) if use_seg else None
    pos_in = positions
    if use_seg:  # packed documents restart their positions
        pos_in = np.array([[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1, 2]])
    attn = Attention(cfg)
    args = (jnp.asarray(x), jnp.asarray(pos_in), seg, prefix, window)
    # Jitted (the arguments closed over, so the window and masks stay static): eagerly,
    # every op of init and forward compiles on its own.
    params = nn.unbox(
        jax.jit(lambda key: attn.init(key, *args), compiler_options=INIT_OPTIONS)(
            jax.random.PRNGKey(0)
        )["params"]
    )
    got = np.asarray(jax.jit(lambda p: attn.apply({"params": p}, *args))(params))
    if use_seg:
        # The reference takes positions 0..T-1; packed positions only matter for RoPE, so
        # compare each segment against the reference run on that segment alone.
        for bi in range(b):
            for s in (1, 2):
                idx = np.where(seg[bi] == s)[0]
                want = _np_attention(cfg, params, x[bi : bi + 1, idx])
                np.testing.assert_allclose(got[bi, idx], want[0], atol=2e-5)
        return
    want = _np_attention(cfg, params, x, window=window, prefix=prefix)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_mask_rules_exhaustive():
    t = 6
    pos = np.tile(np.arange(t), (1, 1))
    prefix = np.array([[1, 1, 0, 0, 0, 0]], bool)
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    m = np.asarray(
        attention_mask(pos, pos, q_segment_ids=seg, kv_segment_ids=seg, kv_prefix=prefix, window=2)
    )[0, 0]
    for q in range(t):
        for k in range(t):
            assert m[q, k] == _np_allowed(q, k, 2, prefix[0], seg[0]), (q, k)


def _tiny(**kw):
    base = dict(vocab_size=37, d_model=32, n_layers=3, n_heads=4, max_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_scan_equals_unrolled_and_remat_keeps_gradients(flavour):
    cfg = _tiny(flavour=flavour, n_kv_heads=2, attention="alternating", window=3)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 37, (2, 9)))
    unrolled = build_model(cfg)
    # Jitted: eagerly, every op of init, forward and gradient compiles on its own.
    init = jax.jit(unrolled.init, compiler_options=INIT_OPTIONS)
    params = nn.unbox(init(jax.random.PRNGKey(0), tokens)["params"])
    layers = [params.pop(f"layer_{i}") for i in range(cfg.n_layers)]
    stacked = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    params.update({f"layer_{i}": layer for i, layer in enumerate(layers)})
    scanned = build_model(ModelConfig(**{**cfg.__dict__, "scan_layers": True}))
    np.testing.assert_allclose(
        jax.jit(unrolled.apply)({"params": params}, tokens),
        jax.jit(scanned.apply)({"params": stacked}, tokens),
        atol=1e-5,
    )

    def grads(model):
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    g_plain = grads(unrolled)
    for policy in ("full", "save_dots"):
        g_remat = grads(build_model(ModelConfig(**{**cfg.__dict__, "remat": policy})))
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(flavour="gpt2"),
        dict(flavour="llama", n_kv_heads=2, scan_layers=True),
        dict(flavour="llama", n_kv_heads=1, attention="alternating", window=4),
    ],
    ids=["gpt2", "llama_gqa_scan", "llama_alternating_local"],
)
def test_kv_cache_greedy_equals_full_forward_argmax(kw):
    cfg = _tiny(**kw)
    model = build_model(cfg)
    prompt = np.random.RandomState(2).randint(0, 37, (3, 6))
    # Jitted like `generate` itself: eagerly, every op of init and forward compiles alone.
    params = nn.unbox(
        jax.jit(model.init, compiler_options=INIT_OPTIONS)(
            jax.random.PRNGKey(3), jnp.asarray(prompt)
        )["params"]
    )
    new = generate(cfg, params, prompt, max_new_tokens=20)
    seq = np.concatenate([prompt, new], axis=1)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(seq)))
    # Token i of the continuation must be the argmax of the full forward at position i-1.
    want = logits.argmax(-1)[:, prompt.shape[1] - 1 : -1]
    np.testing.assert_array_equal(new, want)
    assert len(np.unique(new)) > 1  # a constant output would make the check weak


def test_top_k_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: np.isfinite(np.asarray(out)) & (np.asarray(out) > -1e30)  # noqa: E731
    np.testing.assert_array_equal(kept(filter_logits(logits, 2, 1.0))[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.7))[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.4))[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.9))[0], [1, 1, 1, 0])


def test_parameter_counts_of_shipped_configs():
    from jaxllm.config import load_config

    def count(path):
        cfg = load_config(path)
        shapes = jax.eval_shape(
            lambda: build_model(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        )
        return sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))

    # GPT-2 small: 124.4M with vocab 50257; our vocab is padded to 50304 (+47*768).
    assert count("configs/gpt2_124m.yaml") == 124_439_808 + 47 * 768
    # TinyLlama-1.1B published size: 1,100,048,384 parameters.
    assert count("configs/llama_1b.yaml") == 1_100_048_384
