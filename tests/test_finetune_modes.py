"""Fine-tuning modes: LoRA adapters (merge == unmerged forward, only adapters train), frozen."""

import json
import logging
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
import test_train  # tests/ is on sys.path (conftest.py)

from jaxllm import cli, finetune, lora, optim, sharding, step, transfer
from jaxllm.attention import Projection
from jaxllm.config import load_config
from jaxllm.errors import UserError
from jaxllm.model import build_model
from jaxllm.train import host_params, train
from jaxllm.workdir import restore_params, workdir_config

# test_train's small model, with the step count left to each test.
# Two layers (test_train's SMALL has one): the adapter counts and per-layer merges below
# are written for a 2-layer model.
SMALL = [
    *(o for o in test_train.SMALL if not o.startswith(("train.steps=", "model.n_layers="))),
    "model.n_layers=2",
]
# On a randomly initialised base the adapters must reach every matrix, the LM head
# included, to move the predictions in 20 steps (a pretrained base needs far less).
LORA = [
    "finetune.mode=lora",
    "finetune.lora_targets=kernel$",
    "finetune.trainable=final_norm",
    "optim.lr=3e-2",
    "train.steps=20",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


def _flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora"))
    cfg = load_config("configs/lm_tiny.yaml", SMALL + LORA)
    records = _Records()
    logger = logging.getLogger("jaxllm.train")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = train(cfg, workdir)
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    initial = host_params(summary["session"].steps.init())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return workdir, summary, initial, losses, records.lines


@pytest.mark.slow
def test_lora_trains_only_adapters_and_trainable(lora_run):
    _, summary, initial, _, _ = lora_run
    final = _flat(host_params(summary["state"]))
    initial = _flat(initial)
    assert final.keys() == initial.keys()
    n_adapted = 0
    for path, before in initial.items():
        after = final[path]
        if path.startswith("lora/") and not path.endswith("/scale"):
            assert not np.array_equal(before, after), f"adapter {path} did not train"
            n_adapted += 1
        elif path.startswith("final_norm/"):  # finetune.trainable
            assert not np.array_equal(before, after), path
        else:  # every base weight (and the constant scales) bit-identical
            np.testing.assert_array_equal(before, after, err_msg=path)
    # kernel$ on a 2-layer llama: 4 attention + 3 MLP kernels per layer, plus lm_head.
    assert n_adapted == 2 * (2 * 7 + 1)


@pytest.mark.slow
def test_lora_loss_drops_on_embedded_corpus(lora_run):
    _, summary, _, losses, _ = lora_run
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(f"LoRA 20 steps: train loss {first:.3f} -> {last:.3f} (mean of the last 5)")
    # Measured (2 cores): 8.34 -> 6.77, eval 6.76; uniform is ln(4096) = 8.32.
    assert first > 8.0
    assert last < first - 1.0
    assert summary["eval_loss"] < np.log(4096) - 1.0


@pytest.mark.slow
def test_lora_optimizer_state_only_for_trainable(lora_run):
    _, summary, _, _, log_lines = lora_run
    state = summary["state"]
    cs = summary["session"].steps
    trainable, total = finetune.count_trainable(state.params, cs.labels)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    # Adam's mu and nu for the adapters and final_norm only: nothing for frozen weights.
    assert sum(x.size for x in moments) == 2 * trainable
    assert sum(x.nbytes for x in moments) == 2 * 4 * trainable
    assert trainable < total / 5
    assert any(
        f"trainable {trainable:,} of {total:,} (" in line and "finetune.mode=lora" in line
        for line in log_lines
    ), log_lines
    # Moments are sharded like their parameters (2x2x2 mesh: not all replicated).
    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    mu = _flat_arrays(adam.mu)
    par = {p: x for p, x in _flat_arrays(state.params).items() if p in mu}
    assert mu.keys() == par.keys() and mu
    for p, x in mu.items():
        assert x.sharding.is_equivalent_to(par[p].sharding, x.ndim), p
    assert any(str(x.sharding.spec) != "PartitionSpec()" for x in mu.values())


def _flat_arrays(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, jax.Array)
        )
        if isinstance(leaf, jax.Array)
    }


@pytest.mark.slow
def test_lora_workdir_evaluates_merged(lora_run, capsys):
    workdir, summary, _, _, _ = lora_run
    assert cli.main(["eval", "--workdir", workdir, "train.eval_batches=2"]) == 0
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    capsys.readouterr()
    argv = ["generate", "--workdir", workdir, "--prompt", "The list", "max_new_tokens=4"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("The list")
    # Restoring gives the merged, adapter-free model; init_from the workdir loads it too.
    session, params, _ = restore_params(workdir, workdir_config(workdir, []))
    assert lora.LORA_KEY not in params and session.cfg.finetune.mode == "full"
    expected = _flat(jax.device_get(step.model_params(summary["state"].params)))
    got = _flat(jax.device_get(params))
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-6, atol=1e-7)
    cs = session.steps
    loaded, report = transfer.load_pretrained(
        workdir, cs.init().params, cs.abstract_state.params, session.cfg, cs.mesh, cs.rules
    )
    assert not report["new"]
    for path, value in _flat(jax.device_get(loaded)).items():
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ pure transform


def _model_and_params(*overrides):
    cfg = load_config(None, SMALL + ["model.vocab_size=512"] + list(overrides))
    model = build_model(cfg.model)
    params = jax.jit(lambda: nn.unbox(step.init_params(model, cfg, jax.random.PRNGKey(0))))()
    return cfg, model, params


def _logits(model, params, tokens):
    return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))


def _random_b(params, seed=1):
    """Adapters with a non-zero B (a trained adapter), so the adapter path matters."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))

    def fill(path, x):
        if path[-1].key == "b":
            return 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        return x

    return {**params, "lora": jax.tree_util.tree_map_with_path(fill, params["lora"])}


def test_lora_at_init_equals_base_model():
    cfg, model, params = _model_and_params("finetune.mode=lora")
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, 512)
    with_adapters = finetune.add_adapters(params, cfg.finetune, jax.random.PRNGKey(5))
    assert set(lora.adapters(with_adapters)) == {
        f"layer_{i}/attn/{m}/kernel" for i in range(2) for m in ("query", "key", "value", "out")
    }
    base = _logits(model, params, tokens)
    merged = _logits(model, lora.merge(with_adapters), tokens)
    np.testing.assert_array_equal(base, merged)


def test_merged_forward_equals_unmerged_forward():
    cfg, model, params = _model_and_params(
        "finetune.mode=lora", "finetune.lora_targets=kernel$", "finetune.lora_alpha=32"
    )
    params = _random_b(finetune.add_adapters(params, cfg.finetune, jax.random.PRNGKey(5)))
    ads = lora.adapters(params)
    seen = []

    def unmerged(next_fun, args, kwargs, context):
        # x @ W (+ bias) from the base kernel, plus scale * (x @ A) @ B computed apart.
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, Projection):
            return out
        path = "/".join(module.path) + "/kernel"
        ad = ads[path]
        extra = lora.adapter_output(args[0], ad["a"], ad["b"], ad["scale"], len(module.in_axes))
        seen.append(path)
        return out + extra.reshape(out.shape).astype(out.dtype)

    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, 512)
    base = {k: v for k, v in params.items() if k != lora.LORA_KEY}
    with nn.intercept_methods(unmerged):  # traced (and so intercepted) inside the context
        reference = _logits(model, base, tokens)
    assert sorted(set(seen)) == sorted(ads)
    merged = _logits(model, lora.merge(params), tokens)
    plain = _logits(model, base, tokens)
    assert np.max(np.abs(merged - plain)) > 1e-2  # the adapters matter
    np.testing.assert_allclose(merged, reference, atol=1e-5, rtol=1e-5)


def test_merge_scanned_kernels_per_layer():
    cfg, _, params = _model_and_params(
        "model.scan_layers=true", "finetune.mode=lora", "finetune.lora_targets=layers/.*kernel$"
    )
    params = _random_b(finetune.add_adapters(params, cfg.finetune, jax.random.PRNGKey(5)))
    merged = _flat(jax.jit(lora.merge)(params))
    flat = _flat(params)
    ads = jax.tree.map(np.asarray, lora.adapters(params))
    assert "layers/attn/out/kernel" in ads and "layers/mlp/up/kernel" in ads
    rng = np.random.RandomState(0)
    for path, ad in ads.items():
        kernel = flat[path].astype(np.float64)
        n_in = 2 if "/out/" in path else 1  # out: [layers, heads, kv, embed]
        assert ad["a"].shape[0] == kernel.shape[0] == 2  # one adapter per layer
        for layer in range(2):
            x = rng.randn(3, *kernel.shape[1 : 1 + n_in])
            y_merged = np.tensordot(x, merged[path][layer].astype(np.float64), n_in)
            y_base = np.tensordot(x, kernel[layer], n_in)  # x W + scale * (x A) B, apart:
            extra = float(ad["scale"]) * (x.reshape(3, -1) @ ad["a"][layer] @ ad["b"][layer])
            np.testing.assert_allclose(
                y_merged, y_base + extra.reshape(y_base.shape), atol=1e-5, rtol=1e-5
            )


def test_lora_dropout_only_in_training():
    cfg, _, params = _model_and_params("finetune.mode=lora", "finetune.lora_dropout=0.5")
    params = _random_b(finetune.add_adapters(params, cfg.finetune, jax.random.PRNGKey(5)))
    labels = finetune.param_labels(params, cfg.finetune)
    eval_view = _flat(step.model_params(params))
    no_rng = _flat(finetune.train_view(params, labels, cfg.finetune, rng=None))
    dropped = _flat(finetune.train_view(params, labels, cfg.finetune, jax.random.PRNGKey(9)))
    path = "layer_0/attn/query/kernel"
    np.testing.assert_array_equal(eval_view[path], no_rng[path])
    assert not np.array_equal(eval_view[path], dropped[path])
    # Dropout drops rows of A (the adapter's input features) and rescales the rest.
    ad = lora.adapters(params)[path]
    delta = dropped[path] - _flat(params)[path]
    kept = np.abs(delta).sum(axis=(1, 2)) > 0
    full = np.asarray(lora.delta(_flat(params)[path].shape, ad["a"], ad["b"], ad["scale"]))
    np.testing.assert_allclose(delta[kept], 2.0 * full[kept], atol=1e-6)
    assert 0 < kept.sum() < kept.size


def test_lora_labels_for_a_classifier():
    cfg, _, params = _model_and_params("task=classify", "model.num_classes=3", "finetune.mode=lora")
    params = finetune.add_adapters(params, cfg.finetune, jax.random.PRNGKey(5))
    labels = _flat(finetune.param_labels(params, cfg.finetune, check=True))
    train = sorted(p for p, lab in labels.items() if lab == finetune.TRAIN)
    # The new head trains (finetune.trainable=cls_head) beside the adapters' A and B.
    assert train == sorted(
        ["cls_head/kernel", "cls_head/bias"]
        + [p for p in labels if p.startswith("lora/") and not p.endswith("/scale")]
    )
    assert labels["lora/layer_0/attn/query/kernel/scale"] == finetune.FROZEN
    assert labels["layer_0/attn/query/kernel"] == finetune.FROZEN


# ------------------------------------------------------------------ frozen mode, errors


def _compiled(overrides, n_devices=1):
    cfg = load_config(
        None, SMALL + ["model.vocab_size=512", "mesh.data=-1", "train.steps=3"] + overrides
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices])
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    model = build_model(cfg.model)
    cs = step.compile_steps(model, tx, cfg, optim.make_schedule(cfg.optim, 3), mesh)
    return cfg, cs


@pytest.mark.slow
def test_frozen_mode_freezes_matching_parameters():
    freeze = "token_embed|layers/attn/"
    cfg, cs = _compiled(
        ["model.scan_layers=true", "finetune.mode=frozen", f"finetune.freeze={freeze}"], 2
    )
    state = cs.init()
    before = _flat(host_params(state))
    toks = np.random.RandomState(0).randint(0, 512, (8, 33)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((8, 32))}
    batch = sharding.make_global_batch(batch, cs.mesh, cs.rules)
    for _ in range(3):
        state, metrics = cs.train(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = _flat(host_params(state))
    frozen = [p for p in before if re.search(freeze, p)]
    assert "layers/attn/query/kernel" in frozen and "token_embed/embedding" in frozen
    for path in before:
        if path in frozen:
            np.testing.assert_array_equal(before[path], after[path], err_msg=path)
        else:
            assert not np.array_equal(before[path], after[path]), f"{path} did not train"
    trainable, total = finetune.count_trainable(state.params, cs.labels)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trainable
    assert trainable == sum(v.size for p, v in before.items() if p not in frozen) < total


def test_bad_finetune_configs_are_one_line_errors():
    with pytest.raises(UserError, match=r"finetune\.lora_targets='nomatch' matches no weight"):
        try:
            _compiled(["finetune.mode=lora", "finetune.lora_targets=nomatch"])
        except UserError as e:
            assert "layer_0/attn/query/kernel" in str(e) and "\n" not in str(e)
            raise
    with pytest.raises(UserError, match=r"finetune\.freeze='nothing' matches no parameter"):
        _compiled(["finetune.mode=frozen", "finetune.freeze=nothing"])
    with pytest.raises(UserError, match="freezes every parameter"):
        _compiled(["finetune.mode=frozen", "finetune.freeze=."])
    with pytest.raises(UserError, match=r"finetune\.trainable='head_x' matches no parameter"):
        _compiled(["finetune.mode=lora", "finetune.trainable=head_x"])
    with pytest.raises(UserError, match="not a valid regex"):
        load_config(None, ["finetune.lora_targets=attn/(query"])
    with pytest.raises(UserError, match="lora_rank must be >= 1"):
        load_config(None, ["finetune.lora_rank=0"])
    with pytest.raises(UserError, match="needs finetune.freeze"):
        load_config(None, ["finetune.mode=frozen"])
    with pytest.raises(UserError, match="allowed values: full, frozen, lora"):
        load_config(None, ["finetune.mode=qlora"])
    with pytest.raises(UserError, match="did you mean lora_rank"):
        load_config(None, ["finetune.lora_rnk=4"])
