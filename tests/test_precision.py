"""Precision policies and fp16 dynamic loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import LossScaleConfig, OptimConfig
from jaxllm.errors import UserError
from jaxllm.optim import make_optimizer
from jaxllm.precision import (
    all_finite,
    cast_compute,
    get_policy,
    init_loss_scale,
    scale_loss,
    select_tree,
    unscale,
    update_loss_scale,
)

CFG = LossScaleConfig(initial=2.0**15, growth_interval=3, factor=2.0)


def test_policies():
    fp32, bf16, fp16 = get_policy("fp32"), get_policy("bf16"), get_policy("fp16")
    assert (fp32.param_dtype, fp32.compute_dtype, fp32.output_dtype) == (
        jnp.float32,
        jnp.float32,
        jnp.float32,
    )
    assert (bf16.param_dtype, bf16.compute_dtype, bf16.output_dtype) == (
        jnp.float32,
        jnp.bfloat16,
        jnp.float32,
    )
    assert (fp16.param_dtype, fp16.compute_dtype, fp16.output_dtype) == (
        jnp.float32,
        jnp.float16,
        jnp.float32,
    )
    assert fp16.loss_scaling and not bf16.loss_scaling and not fp32.loss_scaling
    with pytest.raises(UserError, match="fp16"):
        get_policy("fp8")


def test_cast_compute_only_touches_floats():
    tree = {"w": jnp.ones((2, 2), jnp.float32), "ids": jnp.arange(3, dtype=jnp.int32)}
    out = cast_compute(tree, get_policy("bf16"))
    assert out["w"].dtype == jnp.bfloat16
    assert out["ids"].dtype == jnp.int32


def _make_step(policy_name, ls_cfg):
    """A jitted fp16 train step on a tiny linear model, with an optional injected inf."""
    policy = get_policy(policy_name)
    tx = make_optimizer(
        OptimConfig(name="adamw", lr=0.1, schedule="constant", warmup_steps=0), total_steps=10
    )
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    y = jnp.array([1.0, -1.0, 0.5, 0.0])

    def loss_fn(params, poison):
        p = cast_compute(params, policy)
        pred = cast_compute(x, policy) @ p["dense"]["kernel"] + p["dense"]["bias"]
        loss = jnp.mean((pred.astype(jnp.float32) - y) ** 2)
        # `poison` (0 or inf) puts an inf into the gradient, as an fp16 overflow would.
        return loss + poison * jnp.sum(params["dense"]["kernel"])

    @jax.jit
    def step(params, opt_state, ls, poison):
        grads = jax.grad(lambda p: scale_loss(ls, loss_fn(p, poison)))(params)
        grads = unscale(ls, grads)
        finite = all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = select_tree(finite, new_params, params)
        opt_state = select_tree(finite, new_opt, opt_state)
        return params, opt_state, update_loss_scale(ls, finite, ls_cfg), finite

    params = {"dense": {"kernel": jnp.full((3,), 0.1), "bias": jnp.zeros(())}}
    return step, params, tx.init(params)


def _equal_trees(a, b):
    return all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_overflow_skips_step_and_lowers_scale():
    step, params, opt_state = _make_step("fp16", CFG)
    ls = init_loss_scale(CFG, enabled=True)
    assert float(ls.scale) == 2.0**15

    # One good step first, so there is optimizer state (moments, count) to protect.
    params, opt_state, ls, finite = step(params, opt_state, ls, 0.0)
    assert bool(finite) and int(ls.good_steps) == 1

    new_params, new_opt, new_ls, finite = step(params, opt_state, ls, jnp.inf)
    assert not bool(finite)
    assert _equal_trees(new_params, params)  # step skipped
    assert _equal_trees(new_opt, opt_state)  # moments and count untouched
    assert float(new_ls.scale) == 2.0**14
    assert int(new_ls.good_steps) == 0


def test_scale_grows_after_growth_interval_good_steps():
    step, params, opt_state = _make_step("fp16", CFG)
    ls = init_loss_scale(CFG, enabled=True)
    params, opt_state, ls, _ = step(params, opt_state, ls, jnp.inf)
    assert float(ls.scale) == 2.0**14
    scales = []
    for _ in range(CFG.growth_interval):
        before = params
        params, opt_state, ls, finite = step(params, opt_state, ls, 0.0)
        assert bool(finite)
        assert not _equal_trees(params, before)  # good steps do update
        scales.append(float(ls.scale))
    # Unchanged for growth_interval - 1 steps, then multiplied by the factor.
    assert scales == [2.0**14, 2.0**14, 2.0**15]
    assert int(ls.good_steps) == 0


def test_scale_never_below_one():
    cfg = LossScaleConfig(initial=2.0, growth_interval=100, factor=2.0)
    ls = init_loss_scale(cfg, enabled=True)
    for expected in (1.0, 1.0, 1.0):
        ls = update_loss_scale(ls, jnp.asarray(False), cfg)
        assert float(ls.scale) == expected


def test_loss_scaling_rescues_fp16_underflow():
    # d(loss)/dw = x*x = 1e-8 is below fp16's smallest subnormal (6e-8): without a
    # scale the fp16 backward pass flushes it to 0; with 2**15 it survives.
    policy = get_policy("fp16")
    x = jnp.asarray(1e-4, jnp.float32)

    def grad_with(ls):
        def loss(w):
            w16, x16 = cast_compute((w, x), policy)
            return scale_loss(ls, (w16 * x16 * x16).astype(jnp.float32))

        return unscale(ls, jax.grad(loss)(jnp.asarray(1.0)))

    assert float(grad_with(init_loss_scale(CFG, enabled=False))) == 0.0
    np.testing.assert_allclose(float(grad_with(init_loss_scale(CFG, enabled=True))), 1e-8, 1e-2)


def test_disabled_loss_scale_is_noop():
    ls = init_loss_scale(CFG, enabled=False)
    assert float(ls.scale) == 1.0
    loss = jnp.asarray(3.25)
    grads = {"w": jnp.array([1.5, -2.0]), "b": jnp.asarray(jnp.inf)}
    assert scale_loss(ls, loss) is loss
    assert unscale(ls, grads) is grads
    assert not bool(all_finite(grads))
    for finite in [True] * (2 * CFG.growth_interval) + [False]:
        ls = update_loss_scale(ls, jnp.asarray(finite), CFG)
    assert float(ls.scale) == 1.0 and int(ls.good_steps) == 0


def test_loss_scale_is_a_pytree():
    ls = init_loss_scale(CFG, enabled=True)
    leaves, treedef = jax.tree_util.tree_flatten(ls)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).enabled is True
