"""`jaxllm compress`: a recipe runs end to end on a tiny teacher, and bad recipes fail clearly."""

import json
import os

import jax
import numpy as np
import pytest

from jaxllm.cli import main as cli_main
from jaxllm.compress.recipe import load_recipe, run_recipe
from jaxllm.config import load_config
from jaxllm.errors import UserError
from jaxllm.train import train
from jaxllm.workdir import restore_params, workdir_config

QUIET = ["train.progress_bar=false", "train.tensorboard=false", "train.checkpoint_every=0",
         "train.eval_every=0", "train.log_every=5"]  # fmt: skip
# Two teacher layers, one student layer: each stage compiles its own steps, and compile
# time grows with depth (unrolled layers) while no claim here needs more.
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32",
        "train.batch_size=8", "train.eval_batches=1"]  # fmt: skip

RECIPE = """
eval_batches: 1
latency: {batch_size: 2, repeats: 1, prompt_len: 4, new_tokens: 4}
overrides: [train.progress_bar=false, train.tensorboard=false, train.checkpoint_every=0]
stages:
  - name: distill
    kind: distill
    student: [model.n_layers=1]
    hidden_weight: 0.5
    attention_weight: 0.5
    train: [train.steps=6]
  - name: prune
    kind: prune
    pattern: "2:4"
    end: 0.5
    every: 1
    train: [train.steps=6]
  - {name: qat, kind: qat, train: [train.steps=4]}
  - {name: ptq, kind: ptq, source: prune, act: static_per_tensor, calibration_batches: 1}
  - {name: export, kind: export}
"""


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _kernels(params):
    """(path, input-major 2-D view) of every attention/MLP kernel (float or int8 qvalue)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = jax.tree_util.keystr(path)
        if ("attn" in p or "mlp" in p) and ("'kernel']" in p and "scale" not in p):
            a = np.asarray(leaf)
            n_in = 2 if "'out'" in p else 1  # attention out: [heads, head_dim, embed]
            out.append((p, a.reshape(int(np.prod(a.shape[:n_in])), -1)))
    return out


def _assert_2_of_4(params):
    kernels = _kernels(params)
    assert kernels
    for p, k in kernels:
        groups = (k.T.reshape(k.shape[1], -1, 4) != 0).sum(-1)  # groups along the input dim
        assert groups.max() <= 2, p


@pytest.mark.slow
def test_recipe_end_to_end_on_a_tiny_teacher(tmp_path):
    teacher = str(tmp_path / "teacher")
    train(load_config("configs/lm_tiny.yaml", QUIET + TINY + ["train.steps=10"]), teacher)
    out = str(tmp_path / "out")
    result = run_recipe(_write(tmp_path / "r.yaml", RECIPE), teacher, out)
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "distill", "prune", "qat", "ptq", "export"]
    for name in ("report.json", "report.md", "quality_vs_size.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100
    with open(os.path.join(out, "report.json")) as f:
        assert [r["stage"] for r in json.load(f)["rows"]] == list(rows)
    # Half depth: the student lost one block's parameters.
    assert rows["distill"]["params"] < rows["teacher"]["params"]
    assert rows["distill"]["params"] == rows["prune"]["params"]
    assert rows["prune"]["nonzero"] < rows["distill"]["nonzero"]
    # The stored models: 2:4 after pruning, and still 2:4 (in int8) after QAT and PTQ.
    stored = {}
    for name in ("prune", "qat", "ptq"):
        d = os.path.join(out, name, "model")
        _, params, _ = restore_params(d, workdir_config(d, []))
        stored[name] = jax.device_get(params)
        _assert_2_of_4(stored[name])
    qv = stored["ptq"]["layer_0"]["mlp"]["fc"]["kernel"]
    assert qv["qvalue"].dtype == np.int8 and "act_scale" in stored["ptq"]["layer_0"]["mlp"]["fc"]
    # int8 saves 3 of every 4 raw bytes of each kernel (embeddings and norms stay fp32).
    # Orbax compresses, and half of each 2:4 kernel is zeros, so the fp32 kernels already
    # shrink on disk: CI measured a saving of 1.48 bytes a weight. More than one byte a
    # weight is what a real int8 store must still show (fp32 kernels saved as-is: 0).
    kernel_params = sum(k.size for _, k in _kernels(stored["prune"]))
    saved = rows["prune"]["bytes_on_disk"] - rows["ptq"]["bytes_on_disk"]
    assert saved > 1.0 * kernel_params, (saved, kernel_params)
    # Every metric is finite and the int8 model stays near its float source.
    assert all(np.isfinite(r["eval_perplexity"]) and r["forward_ms"] > 0 for r in rows.values())
    assert abs(rows["ptq"]["eval_perplexity"] / rows["prune"]["eval_perplexity"] - 1) < 0.05
    # A stage's model is a workdir `jaxllm eval` reads: same perplexity from disk.
    ptq_dir = os.path.join(out, "ptq", "model")
    assert cli_main(["eval", "--workdir", ptq_dir, "train.eval_batches=1"]) == 0
    with open(os.path.join(ptq_dir, "eval.json")) as f:
        assert json.load(f)["perplexity"] == pytest.approx(rows["ptq"]["eval_perplexity"], 1e-6)
    # The export is the ptq model, byte for byte in its parameters, with a manifest.
    with open(os.path.join(out, "export", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["source_stage"] == "ptq" and manifest["quant"] == "int"
    assert rows["export"]["eval_perplexity"] == rows["ptq"]["eval_perplexity"]
    assert rows["export"]["bytes_on_disk"] == manifest["bytes_on_disk"]


@pytest.mark.parametrize(
    "stages,message",
    [
        ("- {kind: prune, sparsity: 0.5, alpha: 0.3}", "does not use alpha; its keys:"),
        ("- {kind: ptq, source: nowhere}", "not an earlier stage; choose one of teacher"),
        ("- {kind: prune, pattern: '4:2'}", "pattern must be N:M"),
        ("- {kind: prune}", "exactly one of sparsity"),
        ("- {kind: squash}", "allowed values: distill, prune"),
        ("- {name: a, kind: ptq}\n- {name: a, kind: ptq}", "used twice"),
        ("- {kind: prune, sparsity: 0.5, traim: []}", "did you mean train"),
        ("- {kind: distill, cache_teacher: true}", "set topk"),
        ("- {kind: distill, topk: 8, cache_teacher: true, hidden_weight: 1}", "logits only"),
        ("- {kind: export, sparsity: 0.5}", "does not use sparsity"),
    ],
)
def test_bad_recipes_fail_with_one_line(tmp_path, stages, message):
    path = _write(
        tmp_path / "r.yaml", "stages:\n" + "\n".join("  " + s for s in stages.split("\n"))
    )
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_a_stage_cannot_train_an_integer_model(tmp_path):
    from jaxllm.compress.recipe import Model, Stage, run_prune

    cfg = load_config("configs/lm_tiny.yaml", ["model.quant=int"])
    with pytest.raises(UserError, match="integer model; put ptq/qat last"):
        run_prune(Stage(name="p", kind="prune", sparsity=0.5), Model("q", cfg, ""), None, "", None)


def test_shipped_recipes_load():
    for name in sorted(os.listdir("configs/compress")):
        _, stages = load_recipe(os.path.join("configs/compress", name))
        assert stages, name


def test_a_workdir_is_resumed_only_by_the_same_run(tmp_path):
    from jaxllm.compress.recipe import claim_workdir

    recipe = _write(tmp_path / "r.yaml", "stages:\n  - {kind: ptq}\n")
    out = str(tmp_path / "out")
    claim_workdir(out, recipe, "runs/a", ["x=1"])
    claim_workdir(out, recipe, "runs/a", ["x=1"])  # the same command again: resume
    for teacher, extra in (("runs/b", ["x=1"]), ("runs/a", ["x=2"])):
        with pytest.raises(UserError, match="another recipe, teacher or overrides"):
            claim_workdir(out, recipe, teacher, extra)
    _write(recipe, "stages:\n  - {kind: ptq, act: none}\n")
    with pytest.raises(UserError, match="another recipe"):
        claim_workdir(out, recipe, "runs/a", ["x=1"])
    other = tmp_path / "mine"
    other.mkdir()
    _write(other / "notes.txt", "keep me")
    with pytest.raises(UserError, match="not empty and holds no jaxllm compress run"):
        claim_workdir(str(other), recipe, "runs/a", [])
    assert (other / "notes.txt").read_text() == "keep me"


def test_export_never_replaces_a_folder_of_the_users(tmp_path):
    from jaxllm.compress.recipe import Model, Stage, run_export

    mine = tmp_path / "mine"
    mine.mkdir()
    _write(mine / "notes.txt", "keep me")
    src = Model("ptq", load_config("configs/lm_tiny.yaml"), str(tmp_path / "src"))
    with pytest.raises(UserError, match="exists and is not a jaxllm export"):
        run_export(Stage(name="e", kind="export", path=str(mine)), src, None, "", None)
    assert (mine / "notes.txt").read_text() == "keep me"
