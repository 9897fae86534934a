"""Task losses and heads: classify (weights, smoothing, focal), prefix-LM, transfer learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import tasks
from jaxllm.config import ModelConfig, load_config
from jaxllm.errors import UserError
from jaxllm.model import build_model, pool_hidden
from jaxllm.train import host_params, train

SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.checkpoint_every=0",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "optim.warmup_steps=1",
    "mesh.data=1",
]


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_classify_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 2
    labels = np.array([0, 3, 1, 1, -1, 2])  # row 4 is padding
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    ls, gamma = 0.1, 2.0
    # Jitted: eagerly, every op of the loss compiles on its own.
    out = jax.jit(lambda x, y: tasks.classify_loss_sums(x, y, weights, ls, gamma))(
        jnp.asarray(logits), jnp.asarray(labels)
    )

    logp = _np_log_softmax(logits.astype(np.float64))
    valid = labels >= 0
    y = np.where(valid, labels, 0)
    nll = -logp[np.arange(6), y]
    smoothed = (1 - ls) * nll - ls * logp.mean(-1)
    focal = (1 - np.exp(-nll)) ** gamma
    w = weights[y] * valid
    np.testing.assert_allclose(float(out["loss_sum"]), np.sum(smoothed * focal * w), rtol=1e-5)
    np.testing.assert_allclose(float(out["ce_sum"]), np.sum(nll * w), rtol=1e-5)
    np.testing.assert_allclose(float(out["weight_sum"]), w.sum(), rtol=1e-6)
    assert float(out["count_sum"]) == 5
    assert float(out["correct_sum"]) == np.sum((logits.argmax(-1) == y) & valid)
    # The weighted mean is PyTorch's CrossEntropyLoss(weight=w) (reduction="mean").
    plain = jax.jit(lambda x, y: tasks.classify_loss_sums(x, y, weights))(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    np.testing.assert_allclose(
        float(plain["loss_sum"] / plain["weight_sum"]), np.sum(nll * w) / w.sum(), rtol=1e-5
    )


def test_label_smoothing_equals_optax_smoothed_targets():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(3, 5)))
    ours = tasks.smoothed_cross_entropy(logits, targets, 0.2)
    ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, 7), 0.2))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_balanced_class_weights_are_sklearn_formula():
    labels = np.array([0, 0, 0, 1, 2, 2])
    w = tasks.resolve_class_weights("balanced", labels, 4)
    # n / (C * count): 6 / (4 * 3), 6 / (4 * 1), 6 / (4 * 2); class 3 is absent -> 0.
    np.testing.assert_allclose(w, [0.5, 1.5, 0.75, 0.0])
    assert tasks.resolve_class_weights("none", labels, 4) is None
    np.testing.assert_array_equal(tasks.resolve_class_weights([1, 2, 3, 4], None, 4), [1, 2, 3, 4])


def test_pooling_reads_the_last_real_token_or_the_mean():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    seg = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pool_hidden(x, seg, "last"), np.stack([x[0, 1], x[1, 3]]))
    np.testing.assert_allclose(
        pool_hidden(x, seg, "mean"), np.stack([x[0, :2].mean(0), x[1].mean(0)])
    )


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_prefix_lm_source_never_sees_the_target(flavour):
    cfg = ModelConfig(flavour=flavour, vocab_size=50, d_model=32, n_layers=2, n_heads=4)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 50)
    prefix = jnp.arange(12)[None, :] < jnp.array([[5], [7]])  # sources of 5 and 7 tokens
    params = model.init(jax.random.PRNGKey(1), tokens)["params"]

    def hidden(t):
        return model.apply({"params": params}, t, prefix_mask=prefix, return_hidden=True)[1]

    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % 50)  # a target token of both rows
    h0, h1 = hidden(tokens), hidden(changed)
    for row, n in enumerate((5, 7)):
        np.testing.assert_array_equal(h0[row, :n], h1[row, :n])  # the source: untouched
        assert not np.allclose(h0[row, 9:], h1[row, 9:])  # the target: it does change
    # Bidirectional over the source: an early source position sees a later source token.
    later_src = tokens.at[:, 4].set((tokens[:, 4] + 1) % 50)
    assert not np.allclose(hidden(tokens)[:, 0], hidden(later_src)[:, 0])


def test_task_config_errors():
    with pytest.raises(UserError, match="model.num_classes > 0"):
        load_config(None, ["task=classify"])
    with pytest.raises(UserError, match="allowed values: lm, classify, translate, dialogue"):
        load_config(None, ["task=summarize"])
    with pytest.raises(UserError, match="one per class"):
        load_config(None, ["task=classify", "model.num_classes=3", "train.class_weights=[1,2]"])
    with pytest.raises(UserError, match="task=classify only"):
        load_config(None, ["train.class_weights=balanced"])
    with pytest.raises(UserError, match="set task=classify"):
        load_config(None, ["model.num_classes=3"])


@pytest.fixture(scope="module")
def pretrained_lm(tmp_path_factory):
    """A 2-step LM on the embedded docs corpus, with the backbone shape of CLASSIFY."""
    workdir = str(tmp_path_factory.mktemp("lm"))
    cfg = load_config(None, SMALL + ["data.seq_len=32", "train.steps=2"])
    state = train(cfg, workdir, devices=jax.devices()[:1])["state"]
    return workdir, host_params(state)


CLASSIFY = SMALL + [
    "task=classify",
    "data.source=embedded:chatter/topic",
    "data.seq_len=32",
    "model.num_classes=21",
    "train.steps=1",
    "optim.lr=0",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
]


@pytest.mark.slow
def test_init_from_loads_the_backbone_and_adds_a_new_head(pretrained_lm, tmp_path):
    source, lm = pretrained_lm
    cfg = load_config(None, CLASSIFY + [f"init_from={source}"])
    summary = train(cfg, str(tmp_path), devices=jax.devices()[:1])
    got = host_params(summary["state"])
    assert set(got) == set(lm) | {"cls_head"}
    for name in lm:
        for a, b in zip(jax.tree.leaves(lm[name]), jax.tree.leaves(got[name]), strict=True):
            np.testing.assert_array_equal(a, b)  # lr 0: what it started from
    assert got["cls_head"]["kernel"].shape == (64, 21)
    # The tokenizer came with the backbone.
    assert summary["session"].tokenizer.path.startswith(source)
    assert 0.0 <= summary["eval_accuracy"] <= 1.0


@pytest.mark.slow
def test_init_from_reports_mismatched_shapes(pretrained_lm, tmp_path):
    source, _ = pretrained_lm
    cfg = load_config(None, CLASSIFY + [f"init_from={source}", "model.d_model=32"])
    with pytest.raises(
        UserError, match=r"36 parameter.* differ .*final_norm/scale \(64,\) -> \(32,\)"
    ):
        train(cfg, str(tmp_path), devices=jax.devices()[:1])
    cfg = load_config(None, CLASSIFY + [f"init_from={tmp_path}/nowhere"])
    with pytest.raises(UserError, match="is not a directory"):
        train(cfg, str(tmp_path / "b"), devices=jax.devices()[:1])
