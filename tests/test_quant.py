"""Quantisation: STE gradients, int8 matmuls against float references, int4 groups, QAT model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compress.quant import (
    calibrate_scale,
    dequantize,
    dequantize_params,
    fake_quant,
    fake_quant_dot_general,
    int8_dot_general,
    int8_dot_general_cls,
    quantize_params,
    quantize_tensor,
    tree_bytes,
)
from jaxllm.config import ModelConfig
from jaxllm.model import build_model

DENSE = (((2,), (0,)), ((), ()))  # [B, T, in] x [in, out]
OUT_PROJ = (((2, 3), (0, 1)), ((), ()))  # [B, T, heads, dim] x [heads, dim, embed]


def _normal(seed, shape, scale=1.0):
    # numpy draws: a jax.random call would compile once per shape (slow on CPU CI).
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_fake_quant_gradient_is_straight_through_with_static_scale():
    x = jnp.linspace(-2.0, 2.0, 81)  # steps of 0.05: none sits on the clip edge 1.27
    w = jnp.arange(81, dtype=jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(w * fake_quant(x, bits=8, scale=0.01)))(x)
    inside = np.abs(np.asarray(x)) <= 1.27
    assert inside.sum() == 51
    np.testing.assert_array_equal(np.asarray(grad), np.where(inside, np.asarray(w), 0.0))
    # Dynamic absmax scales clip nothing: the gradient is the identity, absmax included.
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, bits=4)))(_normal(0, (7, 9)))
    np.testing.assert_array_equal(np.asarray(g), np.ones((7, 9)))


def test_fake_quant_forward_error_is_at_most_half_a_step():
    x = _normal(1, (16, 24))
    for bits, axis in [(8, None), (8, -1), (4, (0,))]:
        y = fake_quant(x, bits=bits, axis=axis)
        reduce = None if axis is None else (0 if axis == -1 else 1)
        scale = np.abs(np.asarray(x)).max(axis=reduce, keepdims=True) / (2 ** (bits - 1) - 1)
        err = np.abs(np.asarray(y) - np.asarray(x))
        assert np.all(err <= scale / 2 * (1 + 1e-6))
        levels = np.asarray(y) / scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    y = fake_quant(x, scale=0.005)  # static: inside the range still within half a step
    inside = np.abs(np.asarray(x)) <= 0.635
    assert np.all(np.abs(np.asarray(y) - np.asarray(x))[inside] <= 0.0025 + 1e-7)
    assert np.all(np.abs(np.asarray(y))[~inside] == pytest.approx(0.635))


@pytest.mark.parametrize(
    "x_shape,w_path,w_shape,dims,scale_shape",
    [
        ((3, 5, 64), "mlp/fc/kernel", (64, 48), DENSE, (1, 48)),
        ((3, 5, 32), "attn/query/kernel", (32, 4, 8), DENSE, (1, 4, 8)),
        ((3, 5, 4, 8), "attn/out/kernel", (4, 8, 32), OUT_PROJ, (1, 1, 32)),
    ],
)
def test_int8_dot_matches_dequantised_reference(x_shape, w_path, w_shape, dims, scale_shape):
    x, w = _normal(1, x_shape), _normal(2, w_shape, 0.05)
    a, b, leaf = w_path.split("/")
    node = quantize_params({a: {b: {leaf: w}}})[a][b][leaf]
    q, s = node["qvalue"], node["scale"]
    assert q.dtype == jnp.int8 and s.shape == scale_shape and s.dtype == jnp.float32

    # W8A8: per-token int8 activations, int32 accumulation, one float rescale.
    out = int8_dot_general(x, q, s, dims)
    contract = dims[0][0]
    x_scale = np.abs(np.asarray(x)).max(axis=contract, keepdims=True) / 127
    x_deq = np.clip(np.round(np.asarray(x) / x_scale), -127, 127) * x_scale
    w_deq = np.asarray(q, np.float64) * np.asarray(s, np.float64)
    axes = (list(contract), list(dims[0][1]))
    ref = np.tensordot(x_deq.astype(np.float32).astype(np.float64), w_deq, axes)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
    exact = np.tensordot(np.asarray(x, np.float64), np.asarray(w, np.float64), axes)
    assert _rel_err(out, exact) < 0.01  # int8 x int8 stays within 1% of the float dot

    # Weight-only: x @ dequant(W), the scale applied after the float dot.
    wo = int8_dot_general(x, q, s, dims, act_quant=None)
    ref_wo = jax.lax.dot_general(x, dequantize(node), dims, precision="highest")
    np.testing.assert_allclose(np.asarray(wo), np.asarray(ref_wo), rtol=1e-5, atol=1e-6)

    # Static per-tensor activation scale (calibrated absmax) agrees to int8 precision.
    st = int8_dot_general(
        x, q, s, dims, act_quant="static_per_tensor", act_scale=calibrate_scale(x)
    )
    assert _rel_err(st, exact) < 0.02


def test_int4_group_quantisation_round_trip():
    w = _normal(3, (64, 32), 0.05)
    node = quantize_tensor(w, (0,), bits=4, group_axis=0, group_size=16)
    assert node["qvalue"].dtype == jnp.int8 and node["scale"].shape == (4, 32)
    qv = np.asarray(node["qvalue"])
    assert qv.min() >= -8 and qv.max() <= 7 and np.abs(qv).max() == 7
    scale = np.repeat(np.asarray(node["scale"]), 16, axis=0)
    err = np.abs(np.asarray(dequantize(node)) - np.asarray(w))
    assert np.all(err <= scale / 2 * (1 + 1e-6))
    # Groups beat one scale per channel on the same bits.
    per_channel = dequantize(quantize_tensor(w, (0,), bits=4))
    assert _rel_err(dequantize(node), w) < _rel_err(per_channel, w)

    # Tree form: groups along the last input dim (head_dim of the attention output).
    params = {"attn": {"out": {"kernel": _normal(4, (2, 32, 16))}}, "fc": {"kernel": w}}
    q = quantize_params(params, bits=4, group_size=8)
    assert q["attn"]["out"]["kernel"]["scale"].shape == (2, 4, 16)
    assert q["fc"]["kernel"]["scale"].shape == (8, 32)
    deq = dequantize_params(q)
    for path in (("attn", "out", "kernel"), ("fc", "kernel")):
        orig, back, node = params, deq, q
        for k in path:
            orig, back, node = orig[k], back[k], node[k]
        s = np.asarray(node["scale"])
        s = np.repeat(s, orig.shape[-2] // s.shape[-2], axis=-2)
        assert np.all(np.abs(np.asarray(back) - np.asarray(orig)) <= s / 2 * (1 + 1e-6))
    x = _normal(5, (3, 5, 64))
    out = int8_dot_general(
        x, q["fc"]["kernel"]["qvalue"], q["fc"]["kernel"]["scale"], DENSE, act_quant=None
    )
    ref = jax.lax.dot_general(x, deq["fc"]["kernel"], DENSE, precision="highest")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight-only"):
        int8_dot_general(x, q["fc"]["kernel"]["qvalue"], q["fc"]["kernel"]["scale"], DENSE)


def test_quantize_dequantize_round_trip_and_bytes():
    params = {
        "token_embed": {"embedding": _normal(0, (64, 256))},
        "layers": {"mlp": {"fc": {"kernel": _normal(1, (2, 256, 512), 0.02)}}},
        "lm_head": {"kernel": _normal(2, (256, 256), 0.02)},
        "final_norm": {"scale": jnp.ones(256)},
    }
    q = quantize_params(params)
    assert q["layers"]["mlp"]["fc"]["kernel"]["scale"].shape == (2, 1, 512)  # per layer
    np.testing.assert_array_equal(q["token_embed"]["embedding"], params["token_embed"]["embedding"])
    back = dequantize_params(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for name, w in (
        ("fc", params["layers"]["mlp"]["fc"]["kernel"]),
        ("head", params["lm_head"]["kernel"]),
    ):
        node = q["layers"]["mlp"]["fc"]["kernel"] if name == "fc" else q["lm_head"]["kernel"]
        err = np.abs(np.asarray(dequantize(node)) - np.asarray(w))
        assert np.all(err <= np.asarray(node["scale"]) / 2 * (1 + 1e-6)), name
        # Re-quantising the dequantised kernel gives back the very same integers.
        again = quantize_params({"k": {"kernel": dequantize(node)}})["k"]["kernel"]
        if name == "head":
            np.testing.assert_array_equal(np.asarray(again["qvalue"]), np.asarray(node["qvalue"]))
    kernels = {"layers": params["layers"], "lm_head": params["lm_head"]}
    qk = quantize_params(kernels)
    ratio = tree_bytes(kernels) / tree_bytes(qk)
    assert 3.5 < ratio < 4.0  # int8 values + fp32 per-channel scales
    assert tree_bytes(kernels) == 4 * (2 * 256 * 512 + 256 * 256)


def test_calibration_methods():
    x = _normal(6, (4096,))
    q = 127
    assert float(calibrate_scale(x)) == pytest.approx(float(jnp.max(jnp.abs(x))) / q, rel=1e-6)
    assert float(calibrate_scale([x[:100], x[100:]])) == float(calibrate_scale(x))
    assert float(calibrate_scale(x, "percentile", percentile=99.0)) < float(calibrate_scale(x))
    # Heavy tail (Student-t, 3 degrees of freedom): a few outliers stretch the absmax
    # grid; the MSE search clips them and quantises the bulk more finely.
    heavy = jnp.asarray(np.random.default_rng(7).standard_t(3.0, 8192), jnp.float32)
    for bits, gain in ((8, 1.0), (4, 2.0)):
        mse_s = calibrate_scale(heavy, "mse", bits=bits)
        abs_s = calibrate_scale(heavy, "absmax", bits=bits)

        def mse(s, bits=bits):
            return float(jnp.mean((fake_quant(heavy, bits=bits, scale=s) - heavy) ** 2))

        assert float(mse_s) < float(abs_s) and mse(mse_s) * gain < mse(abs_s)
    with pytest.raises(ValueError, match="method"):
        calibrate_scale(x, "median")


def _tiny(**kw):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=64, max_len=16, **kw)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    return cfg, model, params, tokens


def _logits(model, params, tokens):
    # Compiled (eager dispatch is slow); jit's cache is keyed on the bound method, so
    # keep one per model.
    apply = _APPLY.setdefault(id(model), (model, jax.jit(model.apply)))[1]
    return apply({"params": params}, tokens)


_APPLY = {}


def test_qat_transformer_close_to_float_and_gradients_flow():
    cfg, model, params, tokens = _tiny()
    ref = _logits(model, params, tokens)
    qat = build_model(cfg, dot_general_cls=fake_quant_dot_general(weight_bits=8, act_bits=8))
    logits = _logits(qat, params, tokens)
    err = _rel_err(logits, ref)
    assert 1e-4 < err < 0.02  # W8A8 fake quant: quantised, yet within 2% of float
    # Fake quant simulates exactly what the int8 kernel computes (int32 accumulation).
    int8 = build_model(cfg, dot_general_cls=int8_dot_general_cls())
    assert _rel_err(_logits(int8, params, tokens), logits) < 1e-5

    @jax.jit
    def grad(p):
        return jax.grad(lambda p: jnp.mean(qat.apply({"params": p}, tokens) ** 2))(p)

    for path, g in jax.tree_util.tree_flatten_with_path(grad(params))[0]:
        assert float(jnp.linalg.norm(g)) > 0, jax.tree_util.keystr(path)


def test_int8_weights_on_scanned_llama_close_to_float():
    cfg, model, params, tokens = _tiny(flavour="llama", scan_layers=True)
    ref = _logits(model, params, tokens)
    q = quantize_params(params)
    assert q["layers"]["mlp"]["gate"]["kernel"]["scale"].shape == (2, 1, cfg.ff_dim)
    assert q["layers"]["attn"]["out"]["kernel"]["scale"].shape == (2, 1, 1, 32)
    deq = dequantize_params(q)
    assert _rel_err(_logits(model, deq, tokens), ref) < 0.02  # int8 weights (W8)
    int8 = build_model(cfg, dot_general_cls=int8_dot_general_cls())
    assert _rel_err(_logits(int8, deq, tokens), ref) < 0.02  # W8A8, int32 accumulation
    # Weight-only int4 with groups of 16 input weights: coarser, still recognisable.
    int4 = dequantize_params(quantize_params(params, bits=4, group_size=16))
    assert _rel_err(_logits(model, int4, tokens), ref) < 0.2
