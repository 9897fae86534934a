"""Distillation: KD losses against numpy, the student's init from teacher layers, the step."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from jaxllm.compress import distill
from jaxllm.compress.distill_step import Teacher, make_distill_loss_fn
from jaxllm.config import Config, ModelConfig
from jaxllm.model import build_model
from jaxllm.tasks import loss_sums

RNG = np.random.default_rng(0)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(s, t, w, temp):
    """sum(w * KL(softmax(t/T) || softmax(s/T))) in float64, without the T^2 factor."""
    ps, pt = _np_softmax(s / temp), _np_softmax(t / temp)
    return float(np.sum(np.sum(pt * (np.log(pt) - np.log(ps)), -1) * w))


@pytest.mark.parametrize("shape,wshape", [((3, 5, 11), (3, 5)), ((6, 4), (6,))])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_soft_target_kl_equals_numpy(shape, wshape, temp):
    s, t = RNG.normal(size=shape) * 2, RNG.normal(size=shape) * 2
    w = (RNG.random(wshape) > 0.3).astype(np.float32)
    w[0] = 0.0  # a whole zero-weight row (padding)
    got = distill.soft_target_kl_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp)
    # T^2 scaling: the value is T^2 times the plain KL of the tempered distributions.
    assert float(got) == pytest.approx(temp**2 * _np_kl(s, t, w, temp), rel=1e-5)
    # Identical logits: zero divergence.
    same = distill.soft_target_kl_sum(jnp.asarray(s), jnp.asarray(s), jnp.asarray(w), temp)
    assert abs(float(same)) < 1e-5

    def f(s_, t_):
        return distill.soft_target_kl_sum(s_, t_, jnp.asarray(w), temp)

    gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    # No gradient reaches the teacher; the student's is T * w * (p_s - p_t) (Hinton et al.).
    assert float(jnp.max(jnp.abs(gt))) == 0.0
    want = temp * w[..., None] * (_np_softmax(s / temp) - _np_softmax(t / temp))
    np.testing.assert_allclose(np.asarray(gs), want, atol=1e-5)


def test_soft_target_kl_is_finite_with_masked_teacher_logits():
    s = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
    t = s.at[:, 0].set(-jnp.inf)  # a class the teacher rules out: 0 * log 0 counts 0
    got = distill.soft_target_kl_sum(s, t, jnp.ones(2), 1.0)
    p = _np_softmax(np.asarray(s))
    want = -np.sum(np.log(p[:, 1:].sum(-1)))  # KL of the renormalised tail against p
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_kd_loss_mixes_soft_and_hard_by_alpha():
    s, t = jnp.asarray(RNG.normal(size=(2, 3, 7))), jnp.asarray(RNG.normal(size=(2, 3, 7)))
    w = jnp.ones((2, 3))
    hard = {"loss_sum": jnp.float32(4.0), "ce_sum": jnp.float32(4.5)}
    kd = float(distill.soft_target_kl_sum(s, t, w, 2.0))
    assert kd > 0
    out = distill.kd_loss_sums(s, t, hard, w, temperature=2.0, alpha=0.0)
    assert float(out["loss_sum"]) == 4.0  # alpha = 0: exactly the hard-label loss
    for alpha, want in ((1.0, kd), (0.3, 0.3 * kd + 0.7 * 4.0)):
        out = distill.kd_loss_sums(s, t, hard, w, temperature=2.0, alpha=alpha)
        assert float(out["loss_sum"]) == pytest.approx(want, rel=1e-6)
        assert float(out["kd_sum"]) == pytest.approx(kd, rel=1e-6)
        assert float(out["ce_sum"]) == 4.5  # the other sums stay the hard-label ones
    assert float(hard["loss_sum"]) == 4.0 and set(hard) == {"loss_sum", "ce_sum"}  # not mutated
    for alpha in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            distill.kd_loss_sums(s, t, hard, w, temperature=2.0, alpha=alpha)
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            distill.kd_loss_sums(s, t, hard, w, temperature=temp, alpha=0.5)


def test_hidden_mse_equals_numpy():
    w = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
    s, t = RNG.normal(size=(2, 4, 6)), RNG.normal(size=(2, 4, 6))
    got = distill.hidden_mse_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w))
    assert float(got) == pytest.approx(np.sum(np.mean((s - t) ** 2, -1) * w), rel=1e-5)
    # Different widths through the learned projection.
    t = RNG.normal(size=(2, 4, 10))
    proj = RNG.normal(size=(6, 10))
    got = distill.hidden_mse_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), jnp.asarray(proj))
    assert float(got) == pytest.approx(np.sum(np.mean((s @ proj - t) ** 2, -1) * w), rel=1e-5)
    g = jax.grad(distill.hidden_mse_sum, argnums=1)(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), jnp.asarray(proj)
    )
    assert float(jnp.max(jnp.abs(g))) == 0.0
    with pytest.raises(ValueError, match="width 6 != teacher width 10.*proj_kernel"):
        distill.hidden_mse_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w))
    with pytest.raises(ValueError, match=r"expected \(6, 10\)"):
        distill.hidden_mse_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), jnp.ones((10, 6)))


def test_attention_transfer_equals_numpy_with_different_head_counts():
    w = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
    sp = jax.nn.softmax(jnp.asarray(RNG.normal(size=(2, 2, 4, 4))), -1)
    tp = jax.nn.softmax(jnp.asarray(RNG.normal(size=(2, 4, 4, 4))), -1)
    d = np.asarray(sp).mean(1) - np.asarray(tp).mean(1)
    want = np.sum(np.sum(d**2, -1) * w)
    got = distill.attention_transfer_sum(sp, tp, jnp.asarray(w))
    assert float(got) == pytest.approx(want, rel=1e-5)
    g = jax.grad(distill.attention_transfer_sum, argnums=1)(sp, tp, jnp.asarray(w))
    assert float(jnp.max(jnp.abs(g))) == 0.0
    with pytest.raises(ValueError, match="equal B, Tq and Tk"):
        distill.attention_transfer_sum(sp, tp[..., :1], jnp.asarray(w))


def test_layer_map_keeps_the_last_layer_of_each_group():
    assert distill.layer_map(4, 2) == [1, 3]
    assert distill.layer_map(6, 3) == [1, 3, 5]
    assert distill.layer_map(4, 4) == [0, 1, 2, 3]
    assert distill.layer_map(12, 1) == [11]
    for bad in ((4, 3), (4, 0), (2, 4)):
        with pytest.raises(ValueError, match="do not divide"):
            distill.layer_map(*bad)


def _init(cfg, seed):
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
    return model, nn.unbox(params["params"])


def _layer(params, i, scanned):
    """Layer i's subtree, unrolled or as row i of the scanned stack."""
    return jax.tree.map(lambda x: x[i], params["layers"]) if scanned else params[f"layer_{i}"]


@pytest.mark.parametrize(
    "flavour,t_scan,s_scan",
    [("gpt2", False, False), ("gpt2", True, True), ("llama", False, True), ("llama", True, False)],
)
def test_student_takes_the_last_teacher_layer_of_each_group(flavour, t_scan, s_scan):
    base = ModelConfig(
        flavour=flavour, vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_len=16
    )
    # Different seeds, so a copied tensor cannot equal the student's own by accident.
    _, teacher = _init(dataclasses.replace(base, scan_layers=t_scan), 0)
    _, student = _init(dataclasses.replace(base, n_layers=2, scan_layers=s_scan), 1)
    extra = jnp.ones((32, 48))
    student = {**student, "distill_proj": {"kernel": extra}}  # a student-only leaf
    params, copied, kept = distill.student_from_teacher(
        FrozenDict(teacher), FrozenDict(student), 4, 2
    )
    assert type(params) is dict and all(type(v) is dict for v in params.values())
    assert jax.tree.structure(params) == jax.tree.structure(student)
    assert kept == ["distill_proj/kernel"]
    assert len(copied) == len(jax.tree.leaves(student)) - 1
    np.testing.assert_array_equal(params["distill_proj"]["kernel"], extra)
    top = ["token_embed", "final_norm"] + (["pos_embed"] if flavour == "gpt2" else ["lm_head"])
    for name in top:
        jax.tree.map(np.testing.assert_array_equal, params[name], teacher[name])
    # Not vacuous: the student's own embedding differed (norms start as ones in both).
    assert not np.array_equal(
        student["token_embed"]["embedding"], params["token_embed"]["embedding"]
    )
    for i, t in enumerate([1, 3]):
        got, want = _layer(params, i, s_scan), _layer(teacher, t, t_scan)
        own = _layer(student, i, s_scan)["attn"]["query"]["kernel"]
        assert not np.array_equal(own, want["attn"]["query"]["kernel"])
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_student_keeps_mismatched_shapes_and_checks_layer_counts():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_len=16)
    _, teacher = _init(cfg, 0)
    _, student = _init(dataclasses.replace(cfg, n_layers=2), 1)
    wide = jnp.zeros((80, 32))  # a bigger vocabulary: the embedding cannot be copied
    student = {**student, "token_embed": {"embedding": wide}}
    params, copied, kept = distill.student_from_teacher(teacher, student, 4, 2)
    assert kept == ["token_embed/embedding"] and "pos_embed/embedding" in copied
    np.testing.assert_array_equal(params["token_embed"]["embedding"], wide)
    with pytest.raises(ValueError, match="teacher params have 4 layers, not 8"):
        distill.student_from_teacher(teacher, student, 8, 2)
    with pytest.raises(ValueError, match="student params have 2 layers, not 4"):
        distill.student_from_teacher(teacher, student, 4, 4)
    with pytest.raises(ValueError, match="do not divide"):
        distill.student_from_teacher(teacher, student, 4, 3)


def test_distill_loss_is_alpha_mix_of_kd_and_task_loss_in_one_step():
    tcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_len=16)
    scfg = dataclasses.replace(tcfg, n_layers=2)
    t_model, t_params = _init(tcfg, 0)
    s_model, s_params = _init(scfg, 1)
    cfg = Config(model=scfg)
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((2, 8))}
    teacher = Teacher(t_model, t_params, 32, temperature=2.0, alpha=0.25)
    # Jitted (as in the train step): eagerly, every op of both models compiles on its own.
    loss_fn = jax.jit(make_distill_loss_fn(s_model, cfg, teacher, None))
    loss, sums = loss_fn(s_params, batch, jax.random.PRNGKey(0), 16.0, t_params)

    @jax.jit
    def reference(s_params, t_params):
        s_logits = s_model.apply({"params": s_params}, tokens)
        t_logits = t_model.apply({"params": t_params}, tokens)
        return s_logits, t_logits, loss_sums("lm", s_logits, batch, cfg.train)

    s_logits, t_logits, hard = reference(s_params, t_params)
    kd = 4.0 * _np_kl(np.asarray(s_logits), np.asarray(t_logits), np.ones((2, 8)), 2.0)
    assert float(sums["kd_sum"]) == pytest.approx(kd, rel=1e-4)
    assert float(loss) == pytest.approx((0.25 * kd + 0.75 * float(hard["loss_sum"])) / 16, rel=1e-4)
    # The teacher gets no gradient: differentiating w.r.t. its parameters gives zeros.
    g = jax.jit(jax.grad(lambda tp: loss_fn(s_params, batch, jax.random.PRNGKey(0), 16.0, tp)[0]))(
        t_params
    )
    assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g)) == 0.0
    # Hidden-state and attention-map terms add their weighted sums.
    full = Teacher(
        t_model, t_params, 32, alpha=0.25, hidden_weight=0.5, attention_weight=2.0, layer_map=[1, 3]
    )
    loss2, sums2 = jax.jit(make_distill_loss_fn(s_model, cfg, full, None))(
        s_params, batch, jax.random.PRNGKey(0), 16.0, t_params
    )
    assert float(sums2["hidden_sum"]) > 0 and float(sums2["attn_sum"]) > 0
    extra = 0.5 * float(sums2["hidden_sum"]) + 2.0 * float(sums2["attn_sum"])
    assert float(loss2) == pytest.approx(float(loss) + extra / 16, rel=1e-4)
