"""Learning-rate schedules, weight-decay mask and the optimizer factory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import OptimConfig
from jaxllm.errors import UserError
from jaxllm.optim import current_lr, make_optimizer, make_schedule, weight_decay_mask

OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")


def _lrs(total, steps, **kw):
    cfg = OptimConfig(**kw)
    return [current_lr(cfg, total, s) for s in steps]


def test_warmup_cosine_values():
    kw = dict(schedule="warmup_cosine", lr=0.1, warmup_steps=10, min_lr_ratio=0.1)
    got = _lrs(110, [0, 5, 10, 35, 60, 110, 200], **kw)
    # Cosine runs over steps 10..110; at 35 progress = 0.25, at 60 it is 0.5.
    want = [0.0, 0.05, 0.1, 0.01 + 0.045 * (1 + math.cos(math.pi / 4)), 0.055, 0.01, 0.01]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # decay_steps overrides total_steps: cosine over 10..60, so 35 is halfway.
    np.testing.assert_allclose(_lrs(110, [35, 60], decay_steps=60, **kw), [0.055, 0.01], 1e-6)


def test_warmup_linear_values():
    kw = dict(schedule="warmup_linear", lr=0.1, warmup_steps=10, min_lr_ratio=0.1)
    got = _lrs(110, [5, 10, 35, 60, 110, 500], **kw)
    np.testing.assert_allclose(got, [0.05, 0.1, 0.0775, 0.055, 0.01, 0.01], rtol=1e-6)


def test_constant_values():
    assert _lrs(100, [0, 50], schedule="constant", lr=0.1, warmup_steps=0) == pytest.approx(
        [0.1, 0.1]
    )
    got = _lrs(100, [1, 4, 99], schedule="constant", lr=0.1, warmup_steps=4)
    np.testing.assert_allclose(got, [0.025, 0.1, 0.1], rtol=1e-6)


def test_piecewise_values():
    kw = dict(schedule="piecewise", lr=0.1, warmup_steps=10)
    got = _lrs(100, [5, 49, 50, 79, 80, 99], boundaries=[50, 80], factors=[0.5, 0.1], **kw)
    np.testing.assert_allclose(got, [0.05, 0.1, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)
    # No boundaries is allowed: constant after warmup.
    np.testing.assert_allclose(_lrs(100, [5, 50], **kw), [0.05, 0.1], rtol=1e-6)


def test_piecewise_negative_factor_is_a_user_error():
    cfg = OptimConfig(schedule="piecewise", boundaries=[5], factors=[-1.0])
    with pytest.raises(UserError, match="optim.factors"):
        make_schedule(cfg, 10)


def test_rsqrt_values():
    got = _lrs(10**5, [50, 100, 400, 10000], schedule="rsqrt", lr=0.01, warmup_steps=100)
    np.testing.assert_allclose(got, [0.005, 0.01, 0.005, 0.001], rtol=1e-6)
    got = _lrs(10**5, [0, 1, 4, 100], schedule="rsqrt", lr=0.01, warmup_steps=0)
    np.testing.assert_allclose(got, [0.01, 0.01, 0.005, 0.001], rtol=1e-6)


def test_warmup_longer_than_training_is_clamped():
    kw = dict(schedule="warmup_cosine", lr=0.1, warmup_steps=200, min_lr_ratio=0.1)
    got = _lrs(100, [0, 50, 100, 150], **kw)
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.01], rtol=1e-6)
    for name in ("warmup_linear", "constant", "piecewise", "rsqrt"):
        values = _lrs(1, [0, 1, 2], schedule=name, warmup_steps=50, decay_steps=0)
        assert all(math.isfinite(v) for v in values)


def test_schedule_is_jittable():
    sched = make_schedule(OptimConfig(schedule="warmup_cosine", lr=0.1, warmup_steps=10), 110)
    steps = jnp.arange(0, 120, 7)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(sched))(steps), [float(sched(int(s))) for s in steps], rtol=1e-6
    )


def _model_like_params():
    return {
        "token_embed": {"embedding": jnp.ones((10, 4))},
        "pos_embed": {"embedding": jnp.ones((8, 4))},
        "layers": {  # scanned: leading layers axis
            "attn": {"query": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}},
            "ln_1": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))},
            "mlp": {"fc": {"kernel": jnp.ones((2, 4, 8))}},
        },
        "ln_f": {"scale": jnp.ones(4)},
        "lm_head": {"kernel": jnp.ones((4, 10))},
    }


def test_weight_decay_mask_only_kernels():
    mask = weight_decay_mask(_model_like_params())
    flat = {jax.tree_util.keystr(path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    kernels = {k for k in flat if k.endswith("['kernel']")}
    assert kernels == {
        "['layers']['attn']['query']['kernel']",
        "['layers']['mlp']['fc']['kernel']",
        "['lm_head']['kernel']",
    }
    assert all(flat[k] is True for k in kernels)
    assert all(flat[k] is False for k in flat if k not in kernels)
    assert len(flat) == 9


def _quadratic(params):
    return sum(jnp.sum((p - 0.3) ** 2) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_a_quadratic(name):
    cfg = OptimConfig(name=name, lr=0.05, schedule="constant", warmup_steps=0, weight_decay=0.01)
    tx = make_optimizer(cfg, total_steps=10)
    params = {"dense": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), -1.0)}}

    # Jitted: eagerly, each optimizer op compiles on its own; the 5 steps are one program.
    @jax.jit
    def run(params):
        state = tx.init(params)
        losses = [_quadratic(params)]
        for _ in range(5):
            updates, state = tx.update(jax.grad(_quadratic)(params), state, params)
            params = optax.apply_updates(params, updates)
            losses.append(_quadratic(params))
        return jnp.stack(losses)

    losses = np.asarray(run(params)).tolist()
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_is_decoupled_and_masked(name):
    # With zero gradients every optimizer's update is just the decay, -lr*wd*p,
    # and only on kernels.
    cfg = OptimConfig(name=name, lr=0.5, schedule="constant", warmup_steps=0, weight_decay=0.1)
    tx = make_optimizer(cfg, total_steps=10)
    params = _model_like_params()
    # Jitted: eagerly, each optimizer op compiles on its own; init and update are one program.
    updates = jax.jit(
        lambda p: tx.update(jax.tree_util.tree_map(jnp.zeros_like, p), tx.init(p), p)[0]
    )(params)
    mask = weight_decay_mask(params)
    for u, p, m in zip(
        *(jax.tree_util.tree_leaves(t) for t in (updates, params, mask)), strict=True
    ):
        np.testing.assert_allclose(u, -0.05 * p if m else jnp.zeros_like(p), atol=1e-7)


def test_extra_transforms_are_applied_last():
    cfg = OptimConfig(name="adamw", lr=0.1, schedule="constant", warmup_steps=0)
    params = {"dense": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.ones(3)}}
    grads = jax.grad(_quadratic)(params)

    def first_update(tx):
        return tx.update(grads, tx.init(params), params)[0]

    plain = first_update(make_optimizer(cfg, 10))
    doubled = first_update(make_optimizer(cfg, 10, extra=[optax.scale(2.0)]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, 2.0 * a), plain, doubled)
    # A keep-mask style transform zeroes the chosen updates after the optimizer.
    frozen = first_update(
        make_optimizer(
            cfg,
            10,
            extra=[optax.masked(optax.set_to_zero(), {"dense": {"kernel": True, "bias": False}})],
        )
    )
    assert not np.any(np.asarray(frozen["dense"]["kernel"]))
    np.testing.assert_allclose(frozen["dense"]["bias"], plain["dense"]["bias"])


def test_clipping_bounds_the_update():
    kw = dict(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([6.0, 8.0, 0.0, 0.0])}  # global norm 10
    for clip, want in ((1.0, [-0.6, -0.8, 0.0, 0.0]), (0.0, [-6.0, -8.0, 0.0, 0.0])):
        tx = make_optimizer(OptimConfig(clip_norm=clip, warmup_steps=0, **kw), 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], want, rtol=1e-6)


def test_weight_decay_mask_sees_through_partitioned_boxes():
    import flax.linen as nn

    params = {
        "fc": {"kernel": nn.Partitioned(jnp.ones((3, 4)), ("embed", "mlp")), "bias": jnp.ones(4)}
    }
    mask = weight_decay_mask(params)
    assert mask["fc"]["kernel"].value is True
    assert mask["fc"]["bias"] is False
