"""Magnitude pruning: exact counts, N:M groups along the input dim, masks kept through adamw."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.compress.prune import (
    GradualPruningState,
    KeepMaskedState,
    apply_masks,
    gradual_magnitude_pruning,
    keep_masked,
    magnitude_masks,
    polynomial_sparsity,
    prunable,
    sparsity_report,
)
from jaxllm.config import ModelConfig
from jaxllm.model import build_model


def _normal(seed, shape, scale=1.0):
    # numpy draws: a jax.random call would compile once per shape (slow on CPU CI).
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _toy_params():
    return {
        "token_embed": {"embedding": _normal(0, (12, 16))},
        "layer_0": {
            "attn_norm": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
            "mlp": {"fc": {"kernel": _normal(1, (16, 24)), "bias": _normal(2, (24,))}},
        },
        "lm_head": {"kernel": _normal(3, (16, 12))},
    }


@functools.cache
def _model_params(flavour="gpt2", scan_layers=False):
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        vocab_size=64,
        max_len=16,
        flavour=flavour,
        scan_layers=scan_layers,
    )
    init = jax.jit(build_model(cfg).init)  # one compiled init beats eager dispatch
    return nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _leaves(tree):
    return {
        "/".join(str(k.key) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_keep_masked_after_adamw_keeps_pruned_weights_exactly_zero():
    params = _toy_params()
    masks = magnitude_masks(params, 0.5)
    # Documented order: keep_masked LAST. Params are deliberately not pre-masked: the
    # first update must zero them, and weight decay + Adam moments must not revive them.
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), keep_masked(masks))
    state = tx.init(params)

    @jax.jit
    def step(params, state, seed):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for i in range(5):
        new, state = step(new, state, i)
    p, m, p0 = _leaves(new), _leaves(masks), _leaves(params)
    for path in p:
        assert np.all(p[path][~m[path]] == 0.0), path
        assert np.all(p[path][m[path]] != p0[path][m[path]]), path  # the rest trains
    assert int((~m["layer_0/mlp/fc/kernel"]).sum()) == 16 * 24 // 2
    assert m["token_embed/embedding"].all() and m["layer_0/mlp/fc/bias"].all()
    # The masks live in the optimizer state (so checkpoints carry them).
    kept = [s for s in state if isinstance(s, KeepMaskedState)]
    assert len(kept) == 1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), kept[0].masks, masks))


def test_keep_masked_from_function_and_tree_map_params():
    params = _toy_params()
    fn = functools.partial(magnitude_masks, sparsity=0.5)
    for extra in (keep_masked(fn), gradual_magnitude_pruning(0.5, 0, 4, 2)):
        tx = optax.chain(optax.adamw(1e-3), extra)
        state = tx.init(params)
        # jaxllm.sharding shards optimizer state through optax.tree_map_params, which
        # calls init on a placeholder: the mask state must map like the params.
        shapes = optax.tree_map_params(
            tx, lambda x: x.shape, state, transform_non_params=lambda _: None
        )
        masks_state = shapes[1]
        assert masks_state.masks["layer_0"]["mlp"]["fc"]["kernel"] == (16, 24)
    state = keep_masked(fn).init(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.masks, fn(params)))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize(
    "path,shape,lead,n_in",
    [
        ("layer_0/mlp/fc/kernel", (16, 6), 0, 1),
        ("layer_0/attn/query/kernel", (16, 2, 3), 0, 1),
        ("layer_0/attn/out/kernel", (2, 8, 5), 0, 2),
        ("layers/mlp/fc/kernel", (3, 16, 6), 1, 1),
        ("layers/attn/out/kernel", (2, 2, 8, 5), 1, 2),
    ],
)
def test_n_m_pattern_holds_in_every_input_group(n, m, path, shape, lead, n_in):
    w = _normal(7, shape)
    params = {}
    node = params
    parts = path.split("/")
    for key in parts[:-1]:
        node = node.setdefault(key, {})
    node[parts[-1]] = w
    mask = np.asarray(_leaves(magnitude_masks(params, pattern=(n, m)))[path])
    in_size = math.prod(shape[lead : lead + n_in])
    groups = mask.reshape(shape[:lead] + (in_size // m, m, -1))
    mags = np.abs(np.asarray(w)).reshape(groups.shape)
    # Exactly n kept in every group of m consecutive *input* weights ...
    assert np.all(groups.sum(axis=lead + 1) == n)
    # ... and they are the n largest of their group.
    kept_min = np.where(groups, mags, np.inf).min(axis=lead + 1)
    pruned_max = np.where(groups, -np.inf, mags).max(axis=lead + 1)
    assert np.all(kept_min > pruned_max)


def test_n_m_on_scanned_llama_model_and_indivisible_input():
    params = _model_params(flavour="llama", scan_layers=True)
    masks = _leaves(magnitude_masks(params, pattern=(2, 4)))
    for path in ("layers/mlp/gate/kernel", "layers/attn/query/kernel", "layers/attn/out/kernel"):
        mask = masks[path]
        in_size = mask.shape[1] * (mask.shape[2] if "out" in path else 1)
        groups = mask.reshape(mask.shape[0], in_size // 4, 4, -1)
        assert np.all(groups.sum(axis=2) == 2), path
    with pytest.raises(ValueError, match="input size is 6"):
        magnitude_masks({"fc": {"kernel": jnp.ones((6, 4))}}, pattern=(2, 4))


def test_unstructured_per_layer_sparsity_is_exact_with_deterministic_ties():
    params = {
        "fc": {"kernel": _normal(1, (16, 10))},
        "layers": {"fc": {"kernel": _normal(2, (3, 16, 10))}},
        "tie": {"kernel": jnp.ones((4, 5))},
    }
    masks = _leaves(magnitude_masks(params, 0.3))
    k = math.floor(0.3 * 160)
    assert int((~masks["fc/kernel"]).sum()) == k == 48
    assert [int((~layer).sum()) for layer in masks["layers/fc/kernel"]] == [k, k, k]
    # Pruned = the k smallest magnitudes.
    w = np.abs(np.asarray(params["fc"]["kernel"]))
    assert w[~masks["fc/kernel"]].max() < w[masks["fc/kernel"]].min()
    # All-equal weights: exactly floor(0.3 * 20) = 6 pruned, lowest flat indices first.
    assert np.array_equal(np.flatnonzero(~masks["tie/kernel"]), np.arange(6))
    # 0.29 * 100 is 28.999999999999996 in floating point; the count is still 29.
    hundred = {"fc": {"kernel": _normal(3, (10, 10))}}
    assert int((~magnitude_masks(hundred, 0.29)["fc"]["kernel"]).sum()) == 29


def test_global_threshold_prunes_the_globally_smallest():
    params = {"a": {"kernel": _normal(1, (20, 10))}, "b": {"kernel": _normal(2, (10, 30), 0.3)}}
    masks = _leaves(magnitude_masks(params, 0.5, scope="global"))
    mags = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel() for k in "ab"])
    threshold = np.sort(mags)[mags.size // 2 - 1]  # the largest pruned magnitude
    for k in "ab":
        w = np.abs(np.asarray(params[k]["kernel"]))
        assert np.array_equal(masks[f"{k}/kernel"], w > threshold)
    assert sum(int((~m).sum()) for m in masks.values()) == 250
    # The small-magnitude leaf loses far more than half, the large one far less.
    assert (~masks["b/kernel"]).mean() > 0.6 > 0.3 > (~masks["a/kernel"]).mean()


def test_polynomial_schedule_matches_formula():
    f, start, end = 0.8, 10, 110
    for step, progress in [(0, 0.0), (10, 0.0), (35, 0.25), (60, 0.5), (110, 1.0), (500, 1.0)]:
        expect = f * (1 - (1 - progress) ** 3)
        assert float(polynomial_sparsity(step, f, start, end)) == pytest.approx(expect, abs=1e-6)
    assert float(polynomial_sparsity(60, f, start, end)) == pytest.approx(0.7)
    assert float(polynomial_sparsity(60, f, start, end, initial=0.2)) == pytest.approx(0.725)
    assert float(polynomial_sparsity(jnp.array(110), f, start, end)) == np.float32(0.8)


def test_gradual_pruning_reaches_final_sparsity_at_end_under_jit():
    params = {
        "token_embed": {"embedding": _normal(0, (8, 32))},
        "layer_0": {"mlp": {"fc": {"kernel": _normal(1, (32, 16))}}},
        "layers": {"attn": {"query": {"kernel": _normal(2, (2, 32, 2, 8))}}},
    }
    start, end, every, final = 2, 10, 3, 0.75
    cases = [
        (gradual_magnitude_pruning(final, start, end, every), None),
        (gradual_magnitude_pruning(None, 0, 4, 1, pattern=(2, 4)), (2, 4)),
    ]
    for prune, pattern in cases:
        tx = optax.chain(optax.adamw(1e-3, weight_decay=0.1), prune)
        state = tx.init(params)

        @jax.jit
        def step(params, state, tx=tx):
            grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        p, history = params, []
        for _ in range(end + 2):
            p, state = step(p, state)
            history.append(float((np.asarray(p["layer_0"]["mlp"]["fc"]["kernel"]) == 0).mean()))
        assert isinstance(state[1], GradualPruningState) and int(state[1].count) == end + 2
        fc = np.asarray(p["layer_0"]["mlp"]["fc"]["kernel"])
        stacked = np.asarray(p["layers"]["attn"]["query"]["kernel"])
        assert np.all(np.asarray(p["token_embed"]["embedding"]) != 0)
        if pattern is None:
            # Pruned at counts 2, 5, 8 and 10 (end is always a pruning step).
            for count in (2, 5, 8, 10):
                s = np.float32(polynomial_sparsity(count, final, start, end))
                assert history[count] == math.floor(s * 512 + 1e-3) / 512
            assert history[:2] == [0.0, 0.0] and history[3:5] == [history[2]] * 2
            assert history == sorted(history) and history[-1] == history[end] == final
            assert [(layer == 0).mean() for layer in stacked] == [final, final]
        else:
            assert np.all((fc.reshape(8, 4, 16) != 0).sum(axis=1) == 2)
            assert np.all((stacked.reshape(2, 8, 4, 16) != 0).sum(axis=2) == 2)
            assert history[0] == 0.0 < history[1] < 0.5 == history[4]


def test_include_exclude_leave_embeddings_and_norms_untouched():
    params = _model_params()
    flags = _leaves(prunable(params))
    assert flags["layer_0/attn/query/kernel"] and flags["layer_1/mlp/proj/kernel"]
    assert not any(flags[k] for k in flags if "embed" in k or "norm" in k or k.endswith("bias"))
    pruned = _leaves(apply_masks(params, magnitude_masks(params, 0.5)))
    orig = _leaves(params)
    for path in orig:
        if flags[path]:
            assert (pruned[path] == 0).mean() == pytest.approx(0.5, abs=1e-3), path
        else:
            assert np.array_equal(pruned[path], orig[path]), path
    mlp_only = _leaves(magnitude_masks(params, 0.5, include=r"mlp/.*kernel$"))
    assert mlp_only["layer_0/mlp/fc/kernel"].mean() == 0.5
    assert mlp_only["layer_0/attn/query/kernel"].all()


def test_per_layer_overrides_and_report():
    params = _model_params()
    overrides = {r"mlp/proj": 0.75, r"attn/out": 0.0, r"attn/query": (2, 4)}
    masks = magnitude_masks(params, 0.25, overrides=overrides)
    m = _leaves(masks)
    assert (~m["layer_0/mlp/proj/kernel"]).mean() == 0.75
    assert m["layer_1/attn/out/kernel"].all()
    assert (~m["layer_0/mlp/fc/kernel"]).mean() == 0.25
    assert np.all(m["layer_1/attn/query/kernel"].reshape(8, 4, -1).sum(axis=1) == 2)
    report = sparsity_report(params, masks)
    rows = {r["path"]: r for r in report}
    assert rows["layer_0/mlp/proj/kernel"] == {
        "path": "layer_0/mlp/proj/kernel",
        "size": 128 * 32,
        "nonzero": 1024,
        "sparsity": 0.75,
    }
    assert rows["layer_1/attn/query/kernel"]["sparsity"] == 0.5
    assert report[-1]["path"] == "total"
    assert report[-1]["size"] == sum(r["size"] for r in report[:-1])
    assert report[-1]["nonzero"] == sum(r["nonzero"] for r in report[:-1])
    assert "token_embed/embedding" not in rows
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_masks(params, 0.5, pattern=(2, 4))


def _run(tx, params, grads_fn, steps):
    state, history = tx.init(params), []
    for _ in range(steps):
        updates, state = tx.update(grads_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        history.append((params, state))
    return history


def test_decay_pruning_fades_then_holds_exact_n_m_zeros():
    rng = np.random.default_rng(0)
    params = {"mlp": {"fc": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}}
    tx = optax.chain(optax.adam(1e-2), gradual_magnitude_pruning(None, 2, 6, pattern=(2, 4),
                                                                 decay=True))  # fmt: skip
    grads = lambda p: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)  # noqa: E731
    history = _run(tx, params, grads, 12)
    kernels = [np.asarray(p["mlp"]["fc"]["kernel"]) for p, _ in history]
    # Before `end` nothing is exactly zero yet: the pruned weights only shrink.
    assert all(np.count_nonzero(k) == k.size for k in kernels[:6])
    for k, (_, state) in zip(kernels[6:], history[6:], strict=True):
        groups = k.reshape(4, 4, 8)
        assert ((groups != 0).sum(axis=1) == 2).all()  # exactly 2 of every 4 kept
        mask = np.asarray(state[1].masks["mlp"]["fc"]["kernel"])
        np.testing.assert_array_equal(k != 0, mask)
    np.testing.assert_array_equal(kernels[6] != 0, kernels[-1] != 0)  # masks frozen


def test_decay_pruning_at_zero_is_one_shot_and_lets_a_growing_weight_back():
    base = (np.arange(1.0, 17.0, dtype=np.float32) / 16).reshape(16, 1)
    params = {"mlp": {"fc": {"kernel": jnp.asarray(base)}}}
    grads = lambda p: jax.tree.map(jnp.ones_like, p)  # noqa: E731
    one = _run(optax.chain(optax.sgd(1e-3), gradual_magnitude_pruning(None, 0, 0, pattern=(2, 4))),
               params, grads, 3)  # fmt: skip
    dec = _run(optax.chain(optax.sgd(1e-3), gradual_magnitude_pruning(
        None, 0, 0, pattern=(2, 4), decay=True)), params, grads, 3)  # fmt: skip
    for (a, _), (b, _) in zip(one, dec, strict=True):
        np.testing.assert_array_equal(np.asarray(a["mlp"]["fc"]["kernel"]),
                                      np.asarray(b["mlp"]["fc"]["kernel"]))  # fmt: skip
    # Group [0.3, 0.5, 1.0, 0.0]: the gradient pushes the pruned 0.3 up by 0.1 a step.
    kernel = np.asarray([0.3, 0.5, 1.0, 0.0] + list(base[4:, 0]), np.float32)[:, None]
    push = np.zeros_like(kernel)
    push[0] = -1.0
    tx = optax.chain(optax.sgd(0.1), gradual_magnitude_pruning(None, 0, 5, pattern=(2, 4),
                                                               decay=True))  # fmt: skip
    wrap = lambda x: {"mlp": {"fc": {"kernel": jnp.asarray(x)}}}  # noqa: E731
    hist = _run(tx, wrap(kernel), lambda p: wrap(push), 8)
    first = np.asarray(hist[0][1][1].masks["mlp"]["fc"]["kernel"])[:4, 0]
    last = np.asarray(hist[-1][0]["mlp"]["fc"]["kernel"])[:4, 0]
    np.testing.assert_array_equal(first, [False, True, True, False])  # 0.3 pruned at first
    assert last[0] > 0.7 and last[1] == 0.0  # it grew back past 0.5, which was pruned
