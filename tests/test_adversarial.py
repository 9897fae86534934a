"""Adversarial embedding perturbations: FGM norm, PGD ball, the loss mix, the model hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import adversarial, step
from jaxllm.config import AdversarialConfig, load_config
from jaxllm.model import build_model

# Compiler options of the tests' jitted inits: on CPU, LLVM's default level spends seconds
# optimising the threefry draws; level 1 draws the same bits (jaxllm.step.init_compiler_options).
from jaxllm.step import CPU_INIT_COMPILER_OPTIONS as INIT_OPTIONS  # noqa: E402

# A tiny classifier on random tokens: no data pipeline needed.
CLS = [
    "task=classify",
    "model.num_classes=3",
    "model.vocab_size=64",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "data.seq_len=12",
    "train.batch_size=8",
    "mesh.data=1",
]


def _cls_batch(seed=0, rows=8, length=12):
    rng = np.random.RandomState(seed)
    inputs = rng.randint(1, 64, (rows, length)).astype(np.int32)
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[0, 7:] = 0  # one shorter example
    return {
        "inputs": inputs,
        "targets": np.zeros_like(inputs),
        "weights": np.zeros((rows, length), np.float32),
        "segment_ids": segment_ids,
        "label": rng.randint(0, 3, (rows,)).astype(np.int32),
    }


def _linear_sums(a):
    """A loss linear in the perturbation: loss_sum = sum_i <a_i, d_i> (+1 per row)."""

    def sums_at(params, delta):
        del params
        value = jnp.sum(a * delta) if delta is not None else 0.0
        n = jnp.float32(a.shape[0])
        return {"loss_sum": value + n, "ce_sum": value + n, "count_sum": n}

    return sums_at


def test_fgm_perturbation_norm_equals_epsilon_per_example():
    g = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 4)) * jnp.arange(1, 6)[:, None, None]
    g = g.at[2].set(0.0)  # a padding row: no gradient, no perturbation
    r = adversarial.fgm_perturbation(g, 0.7)
    norms = np.asarray(adversarial.example_norms(r))
    np.testing.assert_allclose(norms[[0, 1, 3, 4]], 0.7, rtol=1e-6)
    assert norms[2] == 0.0
    # Same direction as the gradient: cosine 1 per example.
    cos = jnp.sum(r * g, axis=(1, 2)) / (
        adversarial.example_norms(r) * adversarial.example_norms(g)
    )
    np.testing.assert_allclose(np.asarray(cos)[[0, 1, 3, 4]], 1.0, rtol=1e-6)


def test_projection_and_pgd_stay_in_the_ball():
    x = jnp.stack([jnp.full((3, 2), 0.1), jnp.full((3, 2), 5.0)])
    p = adversarial.project_l2(x, 1.0)
    np.testing.assert_array_equal(np.asarray(p[0]), np.asarray(x[0]))  # inside: unchanged
    assert float(adversarial.example_norms(p)[1]) == pytest.approx(1.0, rel=1e-6)
    # For a linear loss the best point of the ball is epsilon * a / ||a||: PGD reaches it.
    a = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
    cfg = AdversarialConfig(method="pgd", epsilon=0.5, steps=4, step_size=0.2)
    r = adversarial.perturbation(_linear_sums(a), None, a.shape, cfg)
    assert np.all(np.asarray(adversarial.example_norms(r)) <= 0.5 * (1 + 1e-6))
    best = adversarial.fgm_perturbation(a, 0.5)
    np.testing.assert_allclose(np.asarray(r), np.asarray(best), atol=1e-6)


def test_adversarial_loss_is_clean_plus_weight_times_attacked():
    a = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 2))
    cfg = AdversarialConfig(method="fgm", epsilon=0.25, weight=0.5)
    sums = adversarial.with_adversarial_loss(_linear_sums(a), None, a.shape, cfg)
    attacked = 3.0 + 0.25 * float(jnp.sum(adversarial.example_norms(a)))  # <a, eps a/|a|>
    assert float(sums["loss_sum"]) == pytest.approx(3.0 + 0.5 * attacked, rel=1e-6)
    assert float(sums["ce_sum"]) == 3.0  # logged metrics stay the clean ones
    assert float(sums["adv_ce_sum"]) == pytest.approx(attacked, rel=1e-6)


def test_model_perturbation_has_norm_epsilon_and_raises_the_loss():
    cfg = load_config(None, CLS)
    model = build_model(cfg.model)
    # Jitted, like `attack` below: eagerly, every op of the init compiles on its own.
    init = jax.jit(lambda key: step.init_params(model, cfg, key), compiler_options=INIT_OPTIONS)
    params = step.strip_boxes(init(jax.random.PRNGKey(0)))
    batch = jax.tree.map(jnp.asarray, _cls_batch())
    kw = {"segment_ids": batch["segment_ids"]}

    @jax.jit
    def attack(p):
        def sums_at(q, delta):
            extra = {} if delta is None else {"embed_perturbation": delta}
            logits = model.apply({"params": q}, batch["inputs"], **kw, **extra)
            nll = -jax.nn.log_softmax(logits)[jnp.arange(8), batch["label"]]
            return {"loss_sum": jnp.sum(nll), "logits": logits}

        zeros = jnp.zeros((8, 12, 32))
        out = {}
        for method in ("fgm", "pgd"):
            r = adversarial.perturbation(sums_at, p, zeros.shape, AdversarialConfig(method, 0.3))
            out[method] = (r, sums_at(p, r)["loss_sum"])
        return out, sums_at(p, None), sums_at(p, zeros)

    out, clean, zero = attack(params)
    np.testing.assert_array_equal(np.asarray(clean["logits"]), np.asarray(zero["logits"]))
    r_fgm, loss_fgm = out["fgm"]
    r_pgd, loss_pgd = out["pgd"]
    np.testing.assert_allclose(np.asarray(adversarial.example_norms(r_fgm)), 0.3, rtol=1e-5)
    assert np.all(np.asarray(adversarial.example_norms(r_pgd)) <= 0.3 * (1 + 1e-5))
    assert float(loss_fgm) > float(clean["loss_sum"])
    assert float(loss_pgd) > float(clean["loss_sum"])
