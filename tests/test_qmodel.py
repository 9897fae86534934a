"""The integer model: int8 kernels held by the model equal the quantised matmul, round-trip."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import Checkpointer
from jaxllm.compress.qmodel import (
    attach_act_scales,
    calibrate_activations,
    dot_general_for,
    quantize_model_params,
)
from jaxllm.compress.quant import int8_dot_general_cls, tree_bytes
from jaxllm.compress.report import dir_bytes
from jaxllm.config import ModelConfig
from jaxllm.model import build_model

# Compiler options of the tests' jitted inits: on CPU, LLVM's default level spends seconds
# optimising the threefry draws; level 1 draws the same bits (jaxllm.step.init_compiler_options).
from jaxllm.step import CPU_INIT_COMPILER_OPTIONS as INIT_OPTIONS  # noqa: E402

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_len=32)


def _params(cfg):
    tokens = jnp.zeros((1, 16), jnp.int32)
    # Jitted: eagerly, every op of the init compiles on its own.
    return nn.unbox(
        jax.jit(build_model(cfg).init, compiler_options=INIT_OPTIONS)(
            jax.random.PRNGKey(0), tokens
        )["params"]
    )


def _apply(cfg, **kw):
    """The model's jitted forward: eagerly, every op compiles on its own."""
    return jax.jit(build_model(cfg, **kw).apply)


def _tokens(seed=1, shape=(3, 16)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("flavour,scan", [("gpt2", False), ("llama", True)])
def test_int_model_equals_quantised_matmul_of_the_float_model(flavour, scan):
    cfg = dataclasses.replace(CFG, flavour=flavour, scan_layers=scan, n_kv_heads=2)
    params = _params(cfg)
    tokens = _tokens()
    int_cfg = dataclasses.replace(cfg, quant="int")
    qparams = quantize_model_params(params, int_cfg)
    # Every attention and MLP kernel is int8 in the tree the model holds; heads and
    # embeddings stay float.
    flat = jax.tree_util.tree_leaves_with_path(qparams)
    kinds = {jax.tree_util.keystr(p): x.dtype for p, x in flat}
    assert any("qvalue" in k and v == jnp.int8 for k, v in kinds.items())
    assert all(v == jnp.float32 for k, v in kinds.items() if "embed" in k or "norm" in k)
    int_logits = _apply(int_cfg)({"params": qparams}, tokens)
    # Reference: the float model whose dot re-quantises each kernel on the fly
    # (int8_dot_general_cls): the same integer matmuls from the float weights.
    ref = _apply(cfg, dot_general_cls=int8_dot_general_cls())({"params": params}, tokens)
    assert _rel(int_logits, ref) < 1e-5
    # And W8A8 stays close to the float model itself.
    exact = _apply(cfg)({"params": params}, tokens)
    assert _rel(int_logits, exact) < 0.05


def test_weight_only_and_int4_groups_match_dequantised_weights():
    from jaxllm.compress.quant import dequantize_params

    params, tokens = _params(CFG), _tokens()
    apply_float = _apply(CFG)  # one compile for both dequantised trees (same shapes)
    for bits, group in ((8, 0), (4, 16)):
        cfg = dataclasses.replace(
            CFG, quant="int", quant_act="none", quant_weight_bits=bits, quant_group_size=group
        )
        qparams = quantize_model_params(params, cfg)
        got = _apply(cfg)({"params": qparams}, tokens)
        ref = apply_float({"params": dequantize_params(qparams)}, tokens)
        assert _rel(got, ref) < 1e-5, (bits, group)


def test_static_activation_scales_from_calibration():
    params, tokens = _params(CFG), _tokens()
    batches = [{"inputs": _tokens(s)} for s in (2, 3)]
    scales = calibrate_activations(build_model(CFG), params, batches, "absmax")
    # One scale per projection: q/k/v/out and fc/proj in each of the 2 layers.
    assert len(scales) == 12 and all(float(s) > 0 for s in scales.values())
    cfg = dataclasses.replace(CFG, quant="int", quant_act="static_per_tensor")
    qparams = attach_act_scales(quantize_model_params(params, cfg), scales)
    apply_int = _apply(cfg)
    got = apply_int({"params": qparams}, tokens)
    exact = _apply(CFG)({"params": params}, tokens)
    assert _rel(got, exact) < 0.1
    # The stored scale is what the layer uses: doubling one changes the output.
    key = "layer_0/mlp/fc"
    qparams["layer_0"]["mlp"]["fc"]["act_scale"] = 2 * scales[key]
    assert _rel(apply_int({"params": qparams}, tokens), got) > 1e-4


def test_int8_checkpoint_round_trips_at_a_quarter_of_the_bytes(tmp_path):
    # Kernels dominate the size (as in any real model); per-file metadata is noise.
    cfg = dataclasses.replace(CFG, quant="int", vocab_size=16, d_model=256)
    params = _params(dataclasses.replace(cfg, quant="none"))
    qparams = quantize_model_params(params, cfg)
    sizes = {}
    for name, tree in (("fp32", params), ("int8", qparams)):
        ck = Checkpointer(str(tmp_path / name), async_save=False)
        ck.save(0, {"params": tree}, {}, force=True)
        ck.close()
        sizes[name] = dir_bytes(str(tmp_path / name))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ),
        jax.eval_shape(lambda: qparams),
    )
    ck = Checkpointer(str(tmp_path / "int8"), async_save=False)
    restored, _ = ck.restore_params(abstract)
    ck.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qparams), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(sizes, tree_bytes(params) / tree_bytes(qparams))
    assert 3.5 < sizes["fp32"] / sizes["int8"] < 4.0
    assert os.path.isdir(tmp_path / "int8")


def test_dot_general_for_is_hashable_so_decoding_compiles_once():
    a = dot_general_for(dataclasses.replace(CFG, quant="int"))
    b = dot_general_for(dataclasses.replace(CFG, quant="int"))
    assert a == b and hash(a) == hash(b)
    assert dot_general_for(CFG) is None
    assert dot_general_for(dataclasses.replace(CFG, quant="fake")) != a
