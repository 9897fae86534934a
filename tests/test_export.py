"""`jaxllm export`: StableHLO and ONNX artifacts give the jaxllm model's logits back."""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.compress.qmodel import quantize_model_params
from jaxllm.config import ModelConfig
from jaxllm.export import export_onnx, export_stablehlo, forward_fn
from jaxllm.model import build_model

# lm_tiny's model (configs/lm_tiny.yaml), randomly initialised.
LM_TINY = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, max_len=256)
FLAVOURS = {
    "gpt2": LM_TINY,
    "llama_scanned": dataclasses.replace(LM_TINY, flavour="llama", n_kv_heads=2, scan_layers=True),
}


def _params(cfg):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.device_get(nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"]))


def _tokens(shape, seed=1, vocab=LM_TINY.vocab_size):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab), np.int32)


def _ort_logits(blob, tokens):
    import onnxruntime as ort

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(None, {"tokens": tokens})[0]


@pytest.mark.parametrize("name", FLAVOURS)
def test_stablehlo_round_trip_equals_logits_for_any_batch_and_length(name):
    cfg = FLAVOURS[name]
    params = _params(cfg)
    blob, io = export_stablehlo(forward_fn(cfg, params), cfg.max_len)
    assert io["inputs"][0]["shape"] == ["batch", "seq"]
    assert io["outputs"][0]["shape"] == ["batch", "seq", cfg.vocab_size]
    exported = jax.export.deserialize(bytearray(blob))
    model = jax.jit(build_model(cfg).apply)
    for shape in ((1, 16), (3, 37)):  # both dimensions are symbolic
        tokens = _tokens(shape)
        want = model({"params": params}, tokens)
        got = exported.call(tokens)
        assert got.shape == (*shape, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FLAVOURS)
def test_onnx_runtime_equals_logits(name):
    cfg = FLAVOURS[name]
    params = _params(cfg)
    blob, io = export_onnx(forward_fn(cfg, params, onnx=True), seq_len=32)
    assert io["inputs"][0]["shape"] == ["batch", 32]
    model = jax.jit(build_model(cfg).apply)
    for batch in (1, 3):  # the batch dimension is symbolic
        tokens = _tokens((batch, 32), seed=batch)
        want = np.asarray(model({"params": params}, tokens))
        got = _ort_logits(blob, tokens)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-4, name


@pytest.mark.parametrize("act", ["dynamic_per_token", "none"])
def test_onnx_int8_model_equals_jaxllm_int8_logits(act):
    cfg = dataclasses.replace(LM_TINY, n_layers=2)
    params = _params(cfg)
    int_cfg = dataclasses.replace(cfg, quant="int", quant_act=act)
    qparams = quantize_model_params(params, int_cfg)
    blob, _ = export_onnx(forward_fn(int_cfg, qparams, onnx=True), seq_len=32)
    import onnx

    graph = onnx.load_from_string(blob).graph
    # The kernels travel as int8 constants: the artifact is the compressed model.
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in int8) == 2 * 12 * cfg.d_model**2
    tokens = _tokens((2, 32))
    int_model = jax.jit(build_model(int_cfg).apply)
    want = np.asarray(int_model({"params": qparams}, tokens))
    got = _ort_logits(blob, tokens)
    fp32 = np.asarray(jax.jit(build_model(cfg).apply)({"params": params}, tokens))
    err, gap = np.abs(got - want), np.abs(want - fp32)
    print(
        f"{act}: |onnx - jaxllm int8| max {err.max():.2e} mean {err.mean():.2e}; "
        f"|int8 - fp32| max {gap.max():.2e} mean {gap.mean():.2e}"
    )
    if act == "none":  # float arithmetic on int8 values: equal up to float rounding
        assert err.max() <= 1e-4
        assert gap.mean() > 100 * err.mean()  # ONNX follows the int8 model, not fp32
    else:
        # W8A8 rounds every activation to an int8 level, so a last-bit float difference
        # upstream (ONNX Runtime's kernels vs XLA's fusions -- or jaxllm eager vs jitted,
        # which differ as much) moves the odd activation by one level: the max error
        # is then of the int8 gap's order, the mean stays well below it.
        assert err.mean() <= 0.2 * gap.mean()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxllm.config import load_config
    from jaxllm.train import train

    path = str(tmp_path_factory.mktemp("export") / "run")
    overrides = [
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.max_len=64",
        "data.seq_len=32",
        "train.steps=2",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.progress_bar=false",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
    ]
    train(load_config("configs/lm_tiny.yaml", overrides), path)
    return path


@pytest.mark.slow  # trains a 2-step workdir first
def test_cli_exports_a_workdir_with_manifest_and_tokenizer(workdir, tmp_path, capsys):
    from jaxllm.precision import get_policy
    from jaxllm.workdir import restore_params, workdir_config

    out = str(tmp_path / "tiny.stablehlo")
    assert main(["export", "--workdir", workdir, "--format", "stablehlo", "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(out + ".json") as f:
        manifest = json.load(f)
    assert printed["bytes"] == manifest["bytes"] == os.path.getsize(out)
    assert manifest["format"] == "stablehlo" and manifest["step"] == 2
    assert manifest["vocab_size"] == 4096 and manifest["source_workdir"] == workdir
    assert os.path.isfile(os.path.join(tmp_path, manifest["tokenizer"]))
    cfg = workdir_config(workdir, [])
    _, params, _ = restore_params(workdir, cfg)
    params = jax.device_get(params)
    tokens = _tokens((2, 20), vocab=4096)
    want = build_model(cfg.model, get_policy(cfg.precision)).apply({"params": params}, tokens)
    with open(out, "rb") as f:
        got = jax.export.deserialize(bytearray(f.read())).call(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)

    # An existing --out is refused, and replaced with --overwrite.
    args = ["export", "--workdir", workdir, "--format", "stablehlo", "--out", out]
    assert main(args) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    "case,expected",
    [
        ("format", "unknown export format 'tflite'; valid: stablehlo, onnx"),
        ("workdir", "does not exist; pass a trained workdir"),
        ("packages", "ONNX export needs jax2onnx and onnx: pip install 'jaxllm[export]'"),
    ],
)
def test_export_user_errors_are_one_line(case, expected, tmp_path, capsys, monkeypatch):
    workdir, fmt = str(tmp_path), "onnx"
    if case == "format":
        fmt = "tflite"
    elif case == "workdir":
        workdir = str(tmp_path / "missing")
    else:
        monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import now raises ImportError
    args = ["export", "--workdir", workdir, "--format", fmt, "--out", str(tmp_path / "m.onnx")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllm: error: ") and expected in err and err.count("\n") == 1


@pytest.mark.slow  # uses the trained workdir
def test_cli_exports_an_int8_workdir_to_onnx(workdir, tmp_path, capsys):
    import shutil

    from jaxllm.checkpoint import Checkpointer
    from jaxllm.config import save_config
    from jaxllm.workdir import restore_params, workdir_config

    # A PTQ'd workdir, as `jaxllm compress` writes one: model.quant=int in its config
    # and the int8 kernels + scales in its checkpoint.
    cfg = workdir_config(workdir, [])
    _, params, _ = restore_params(workdir, cfg)
    int_cfg = workdir_config(workdir, ["model.quant=int", "model.quant_act=none"])
    qparams = quantize_model_params(jax.device_get(params), int_cfg.model)
    ptq = str(tmp_path / "ptq")
    os.makedirs(ptq)
    shutil.copyfile(cfg.data.tokenizer, os.path.join(ptq, os.path.basename(cfg.data.tokenizer)))
    int_cfg.data.tokenizer = ""
    save_config(int_cfg, os.path.join(ptq, "config.yaml"))
    ck = Checkpointer(os.path.join(ptq, "checkpoints"), async_save=False)
    ck.save(2, {"params": qparams}, {}, force=True)
    ck.close()

    out = str(tmp_path / "tiny_int8.onnx")
    assert main(["export", "--workdir", ptq, "--format", "onnx", "--out", out]) == 0
    with open(out + ".json") as f:
        manifest = json.load(f)
    assert manifest["quant"] == "int" and manifest["inputs"][0]["shape"] == ["batch", 32]
    tokens = _tokens((3, 32), vocab=4096)
    want = jax.jit(build_model(int_cfg.model).apply)({"params": qparams}, tokens)
    with open(out, "rb") as f:
        got = _ort_logits(f.read(), tokens)
    assert np.max(np.abs(got - np.asarray(want))) <= 1e-4
