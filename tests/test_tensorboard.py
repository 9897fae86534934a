"""TensorBoard: weight histograms, sparsity and quant-scale scalars, and profiler traces.

The event files are read back with tensorboardX's protobufs (TFRecord framing parsed
here), so the test needs no TensorFlow or tensorboard package.
"""

import glob
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxllm.compress.prune import apply_masks, magnitude_masks, path_str
from jaxllm.compress.qmodel import attach_act_scales, quantize_model_params
from jaxllm.config import ModelConfig, load_config
from jaxllm.errors import UserError
from jaxllm.logger import MetricsLogger, param_summaries
from jaxllm.model import build_model

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_len=32)


def read_events(logdir):
    """{tag: [(step, value)]}: scalars as floats, histograms as their value counts."""
    found = {}
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                value = v.histo.num if v.HasField("histo") else v.simple_value
                found.setdefault(v.tag, []).append((event.step, value))
    return found


def _params(cfg=CFG):
    tokens = jnp.zeros((1, 8), jnp.int32)
    # Jitted: eagerly, every initializer op compiles on its own.
    init = jax.jit(build_model(cfg).init)
    return jax.device_get(nn.unbox(init(jax.random.PRNGKey(0), tokens)["params"]))


def _leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sparsity_scalars_equal_the_zero_fraction_of_a_pruned_tree(tmp_path):
    params = _params()
    # Jitted: eagerly, the masking ops compile once per leaf shape.
    pruned = jax.tree.map(np.array, jax.jit(apply_masks)(params, magnitude_masks(params, 0.6)))
    # One kernel gets extra exact zeros of its own, so the layers differ.
    pruned["layer_1"]["mlp"]["fc"]["kernel"][:5] = 0.0
    logger = MetricsLogger(str(tmp_path))
    logger.write_params(7, pruned)
    logger.close()
    events = read_events(os.path.join(tmp_path, "tensorboard"))
    leaves = _leaves(pruned)
    kernels = {p: x for p, x in leaves.items() if p.endswith("kernel") and "embed" not in p}
    assert len(kernels) == 12  # q/k/v/out/fc/proj in 2 layers
    for path, x in kernels.items():
        ((step, logged),) = events[f"sparsity/{path}"]
        assert step == 7 and logged == pytest.approx(np.mean(x == 0), abs=1e-7), path
    total = sum(int(np.sum(x == 0)) for x in kernels.values()) / sum(
        x.size for x in kernels.values()
    )
    assert events["sparsity/total"][0][1] == pytest.approx(total, abs=1e-7)
    assert (
        events["sparsity/layer_1/mlp/fc/kernel"][0][1]
        > events["sparsity/layer_0/mlp/fc/kernel"][0][1]
    )
    # Embeddings and norms are not pruned, so they get no sparsity scalar.
    assert not any("embed" in t or "norm" in t for t in events if t.startswith("sparsity/"))
    # Every leaf has a histogram holding all its values.
    for path, x in leaves.items():
        assert events[f"params/{path}"] == [(7, x.size)], path


def test_quant_scale_ranges_of_int8_and_qat_models():
    import dataclasses

    params = _params()
    cfg = dataclasses.replace(CFG, quant="int", quant_act="static_per_tensor")
    qparams = quantize_model_params(params, cfg)
    act = {"layer_0/attn/query": np.float32(0.25), "layer_1/mlp/proj": np.float32(0.5)}
    qparams = jax.device_get(attach_act_scales(qparams, act))
    _, scalars = param_summaries(qparams, cfg)
    scale = np.asarray(qparams["layer_1"]["mlp"]["fc"]["kernel"]["scale"], np.float64)
    tag = "quant/layer_1/mlp/fc/weight_scale"
    assert scalars[f"{tag}_min"] == scale.min() and scalars[f"{tag}_max"] == scale.max()
    assert scalars[f"{tag}_mean"] == pytest.approx(scale.mean(), rel=1e-12)
    assert len([t for t in scalars if t.endswith("weight_scale_max")]) == 12
    assert scalars["quant/layer_1/mlp/proj/act_scale_max"] == 0.5
    # QAT (model.quant=fake): the scales the fake-quantiser derives per output channel.
    _, scalars = param_summaries(params, dataclasses.replace(CFG, quant="fake"))
    kernel = np.abs(np.asarray(params["layer_0"]["attn"]["out"]["kernel"]))  # [heads, hd, d]
    want = kernel.max(axis=(0, 1)) / 127
    assert scalars["quant/layer_0/attn/out/weight_scale_min"] == pytest.approx(want.min())
    assert scalars["quant/layer_0/attn/out/weight_scale_mean"] == pytest.approx(want.mean())
    assert not any(t.startswith("quant/") for t in param_summaries(params, CFG)[1])


TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_len=64",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.progress_bar=false",
    "train.preflight_disk=false",
    "train.eval_batches=1",
]


@pytest.mark.slow  # a 3-step training run
def test_training_logs_histograms_and_writes_a_profile_trace(tmp_path):
    from jaxllm.train import train

    overrides = [
        *TINY,
        "train.steps=3",
        "train.histogram_every=2",
        "train.profile_start=1",
        "train.profile_steps=1",
    ]
    workdir = str(tmp_path / "run")
    summary = train(load_config("configs/lm_tiny.yaml", overrides), workdir)
    events = read_events(os.path.join(workdir, "tensorboard"))
    leaves = _leaves(jax.device_get(summary["state"].params))
    for path, x in leaves.items():
        # Step 2 (every 2 steps) and the last step, 3; each histogram counts every value.
        assert events[f"params/{path}"] == [(2, x.size), (3, x.size)], path
    assert [s for s, _ in events["sparsity/total"]] == [2, 3]
    assert events["sparsity/total"][-1][1] == 0.0  # a dense model has no zero weights
    assert "loss" in events  # the scalars are still there
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*"))
    assert any(t.endswith((".xplane.pb", ".trace.json.gz")) for t in traces), traces
    assert all(os.path.getsize(t) > 0 for t in traces)


def test_logging_keys_are_validated():
    with pytest.raises(UserError, match="'train.histogram_every' must be >= 0, got -1"):
        load_config("configs/lm_tiny.yaml", ["train.histogram_every=-1"])
    with pytest.raises(UserError, match="'train.profile_steps' must be >= 0"):
        load_config("configs/lm_tiny.yaml", ["train.profile_steps=-2"])
