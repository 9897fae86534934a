"""Top-k distillation and the teacher cache: numbers against references and in-step runs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compress import distill
from jaxllm.compress.distill_step import Teacher
from jaxllm.compress.teacher_cache import TopKCache, topk_cache_hook
from jaxllm.config import load_config
from jaxllm.errors import UserError
from jaxllm.step import StepHooks
from jaxllm.train import build_session, train

RNG = np.random.default_rng(3)
QUIET = ["train.progress_bar=false", "train.tensorboard=false", "train.checkpoint_every=0",
         "train.eval_every=0", "train.log_every=1", "train.eval_batches=1"]  # fmt: skip
TINY = ["model.d_model=32", "model.n_heads=2", "data.seq_len=16", "train.batch_size=8",
        "train.steps=3", "optim.warmup_steps=0"]  # fmt: skip


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_topk_kl_equals_full_kl_at_k_equal_v_and_numpy_below(temp):
    s, t = RNG.normal(size=(3, 5, 11)) * 2, RNG.normal(size=(3, 5, 11)) * 2
    w = (RNG.random((3, 5)) > 0.3).astype(np.float32)
    # Jitted, T an argument (one program for both temperatures): eagerly, every op
    # compiles on its own.
    soft_kl, topk_kl = jax.jit(distill.soft_target_kl_sum), jax.jit(distill.topk_kl_sum)
    teacher_topk = jax.jit(distill.teacher_topk, static_argnums=1)
    full = soft_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp)
    every = topk_kl(jnp.asarray(s), *teacher_topk(jnp.asarray(t), 11, temp), jnp.asarray(w), temp)
    assert float(every) == pytest.approx(float(full), rel=1e-5)
    # k = 4: the teacher's 4 largest tokens plus "the rest" as a fifth outcome.
    vals, idx, lse = teacher_topk(jnp.asarray(t), 4, temp)
    got = topk_kl(jnp.asarray(s), vals, idx, lse, jnp.asarray(w), temp)
    log_pt_all, log_ps_all = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    order = np.argsort(-t, -1)[..., :4]
    np.testing.assert_array_equal(np.asarray(idx), order)
    pt = np.exp(np.take_along_axis(log_pt_all, order, -1))
    ps = np.exp(np.take_along_axis(log_ps_all, order, -1))
    pt5 = np.concatenate([pt, 1 - pt.sum(-1, keepdims=True)], -1)
    ps5 = np.concatenate([ps, 1 - ps.sum(-1, keepdims=True)], -1)
    want = temp**2 * np.sum(np.sum(pt5 * (np.log(pt5) - np.log(ps5)), -1) * w)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Gradients: none reach the cached teacher side; the student's are finite.
    gs, gv = jax.jit(
        jax.grad(
            lambda s_, v_: distill.topk_kl_sum(s_, v_, idx, lse, jnp.asarray(w), temp),
            argnums=(0, 1),
        )
    )(jnp.asarray(s, jnp.float32), vals)
    assert float(jnp.max(jnp.abs(gv))) == 0.0 and bool(jnp.all(jnp.isfinite(gs)))
    # At k = V the (empty) rest bucket adds no NaN to the gradient.
    g_all = jax.jit(
        jax.grad(
            lambda s_: distill.topk_kl_sum(
                s_, *distill.teacher_topk(jnp.asarray(t), 11, temp), jnp.asarray(w), temp
            )
        )
    )(jnp.asarray(s, jnp.float32))
    g_full = jax.jit(
        jax.grad(lambda s_: distill.soft_target_kl_sum(s_, jnp.asarray(t), jnp.asarray(w), temp))
    )(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(np.asarray(g_all), np.asarray(g_full), atol=1e-5)


def _teacher(cfg):
    """A randomly initialised 4-layer teacher on the same devices as the student."""
    session = build_session(cfg, None)
    return session.model, session.steps.init().params


def _student_run(tmp_path, name, cfg, teacher, extras=None):
    hooks = StepHooks(teacher=teacher, batch_extras=extras)
    summary = train(cfg, str(tmp_path / name), None, hooks)
    return jax.device_get(summary["state"].params), summary


@pytest.mark.slow
def test_cached_teacher_trains_exactly_like_the_in_step_teacher(tmp_path):
    t_cfg = load_config("configs/lm_tiny.yaml", QUIET + TINY + ["model.n_layers=4"])
    s_cfg = load_config("configs/lm_tiny.yaml", QUIET + TINY + ["model.n_layers=2"])
    t_model, t_params = _teacher(t_cfg)
    k = 16

    def teacher(cached):
        return Teacher(t_model, None if cached else t_params, 32, temperature=2.0, alpha=0.6,
                       topk=k, cached=cached)  # fmt: skip

    in_step, s1 = _student_run(tmp_path, "in_step", s_cfg, teacher(False))
    cache_dir = str(tmp_path / "cache")
    hook = topk_cache_hook(t_model, t_params, k, 2.0, cache_dir)
    cached, s2 = _student_run(tmp_path, "cached", s_cfg, teacher(True), hook)
    # Same batches, same teacher top-k: the same parameters after 3 steps.
    for a, b in zip(jax.tree.leaves(in_step), jax.tree.leaves(cached), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert s1["final_loss"] == pytest.approx(s2["final_loss"], rel=1e-5)
    # The cache: one process folder, complete, the shapes of 3 steps of [8, 16, k].
    cache = TopKCache(os.path.join(cache_dir, "process_000"))
    assert cache.values.shape == (3, 8, 16, k) and cache.indices.dtype == np.int32
    with open(os.path.join(cache.path, "meta.json")) as f:
        assert json.load(f)["k"] == k
    # The values are the teacher's largest logits, in order, for the cached inputs.
    logits = t_model.apply({"params": t_params}, jnp.asarray(cache.inputs[0]))
    want = distill.teacher_topk(logits, k, 2.0)
    np.testing.assert_allclose(cache.values[0], np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.lse[0], np.asarray(want[2]), rtol=1e-5, atol=1e-5)
    # A batch the cache was not built from, or a step past it, is a clear error.
    bad = {"inputs": np.asarray(cache.inputs[1])}
    with pytest.raises(UserError, match="not the one the teacher cache"):
        cache.batch_extras(0, bad)
    with pytest.raises(UserError, match="holds 3 steps"):
        cache.batch_extras(3, bad)
    # The same settings again (a resumed or repeated run) reuse the files untouched.
    stamp = os.path.getmtime(os.path.join(cache.path, "values.npy"))
    extras = hook(s2["session"])
    assert os.path.getmtime(os.path.join(cache.path, "values.npy")) == stamp
    np.testing.assert_array_equal(
        extras(2, {"inputs": np.asarray(cache.inputs[2])})["teacher_lse"], cache.lse[2]
    )


def test_topk_at_full_vocabulary_equals_full_distillation_in_the_step_loss():
    import dataclasses

    import flax.linen as nn

    from jaxllm.compress.distill_step import make_distill_loss_fn
    from jaxllm.config import Config, ModelConfig
    from jaxllm.model import build_model

    tcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=16)
    scfg = dataclasses.replace(tcfg, n_layers=1)
    models = [build_model(c) for c in (tcfg, scfg)]
    # Jitted: eagerly, every op of init and of each loss and gradient compiles on its own.
    t_params, s_params = (
        nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(i), jnp.zeros((1, 8), jnp.int32))["params"])
        for i, m in enumerate(models)
    )
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((2, 8))}

    def loss_and_grad(topk):
        teacher = Teacher(models[0], t_params, 32, temperature=2.0, alpha=0.7, topk=topk)
        fn = make_distill_loss_fn(models[1], Config(model=scfg), teacher, None)
        return jax.jit(
            jax.value_and_grad(lambda p: fn(p, batch, jax.random.PRNGKey(0), 16.0, t_params)[0])
        )(s_params)

    (full, g_full), (every, g_every) = loss_and_grad(0), loss_and_grad(64)
    assert float(every) == pytest.approx(float(full), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_every), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Fewer tokens: a different (larger-or-equal rest bucket) loss, still finite.
    some, _ = loss_and_grad(8)
    assert np.isfinite(float(some)) and float(some) != pytest.approx(float(full), rel=1e-3)
