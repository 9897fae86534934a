"""Task evaluation on the whole mesh, and `eval --compare` (paired bootstrap A/B)."""

import json

import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.compare import compare_workdirs
from jaxllm.config import load_config
from jaxllm.evaluation import evaluate
from jaxllm.train import train
from jaxllm.workdir import restore_params, workdir_config

pytestmark = pytest.mark.slow  # end-to-end runs (still in CI, not in make test-fast)

TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.vocab_size=1024",
    "train.batch_size=8",
    "train.log_every=5",
    "train.eval_every=0",
    "train.eval_batches=0",
    "train.checkpoint_every=0",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "mesh.data=1",
]
TASKS = {
    "translate": [
        "task=translate",
        "data.source=embedded:numbers/en-de",
        "data.seq_len=48",
        "model.flavour=llama",
        "model.n_kv_heads=2",
        "eval.max_examples=24",
        "eval.max_new_tokens=20",
        "eval.batch_size=16",
    ],
    "classify": [
        "task=classify",
        "data.source=embedded:chatter/topic",
        "data.seq_len=48",
        "model.num_classes=21",
    ],
}


@pytest.fixture(scope="module", params=sorted(TASKS))
def trained(request, tmp_path_factory):
    """A short run of each task (long enough to score above 0), trained on one device."""
    workdir = str(tmp_path_factory.mktemp(request.param))
    steps = {"translate": 80, "classify": 20}[request.param]
    cfg = load_config(None, TINY + TASKS[request.param] + [f"train.steps={steps}"])
    summary = train(cfg, workdir, devices=jax.devices()[:1])
    return request.param, workdir, summary


def _eval(workdir, devices, overrides=()):
    cfg = workdir_config(workdir, list(overrides))
    if len(devices) == 1:
        cfg.mesh.data = 1
    session, params, _ = restore_params(workdir, cfg, devices)
    return evaluate(session, params, generate=True, keep_outputs=True)


def test_eight_devices_score_exactly_what_one_device_does(trained):
    task, workdir, summary = trained
    one = _eval(workdir, jax.devices()[:1])
    eight = _eval(workdir, jax.devices())
    assert len(jax.devices()) == 8
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-5)
    if task == "classify":
        np.testing.assert_array_equal(
            one["outputs"]["predictions"], eight["outputs"]["predictions"]
        )
        assert one["examples"] == eight["examples"] == 90  # the whole validation split
        for key in ("macro_f1", "majority_accuracy"):
            assert one[key] == eight[key]
    else:
        # Decoding sharded over 8 devices writes the same sentences as on one.
        assert one["outputs"]["hypotheses"] == eight["outputs"]["hypotheses"]
        assert one["examples"] == 24
        for key in ("bleu", "chrf", "rouge_l", "exact_match"):
            assert one[key] == eight[key]
        # The final eval of training (same params, one device) agrees too.
        np.testing.assert_allclose(summary["eval_bleu"], one["bleu"], rtol=1e-6)
        assert len(one["details"]["samples"]) == 5


def test_compare_against_itself_gives_p_one_and_zero_interval(trained, tmp_path):
    task, workdir, _ = trained
    result = compare_workdirs(workdir, workdir, ["eval.bootstrap_samples=200"])
    assert result["metric"] == {"translate": "bleu", "classify": "accuracy"}[task]
    assert result["delta"] == 0.0 and result["p_value"] == 1.0
    assert result["ci95"] == [0.0, 0.0]
    assert result["a"] == result["b"] > 0


def test_eval_cli_writes_task_metrics_and_compare_json(trained, capsys):
    task, workdir, _ = trained
    assert main(["eval", "--workdir", workdir]) == 0
    with open(f"{workdir}/eval.json") as f:
        result = json.load(f)
    assert result["task"] == task
    if task == "classify":
        assert "macro avg" in result["details"]["report"]
        assert np.asarray(result["details"]["confusion_matrix"]).shape == (21, 21)
    else:
        assert {"bleu", "chrf", "rouge_l", "exact_match", "baseline_bleu"} <= set(result)
    out = capsys.readouterr().out
    assert "loss" in out
    # `generate` speaks the task: a translation of one source equals what the batched,
    # left-padded eval decoded for it; a classifier prints its top labels.
    from jaxllm.data import load_records

    cfg = workdir_config(workdir, [])
    first = load_records(cfg.data, "validation", task)[0]
    prompt = first["source"] if task == "translate" else first["text"]
    assert main(["generate", "--workdir", workdir, "--prompt", prompt]) == 0
    printed = capsys.readouterr().out.strip()
    if task == "translate":
        assert printed == result["details"]["samples"][0]["hypothesis"].strip()
    else:
        lines = [line.split("\t") for line in printed.splitlines()]
        assert len(lines) == 5 and 0 < sum(float(p) for _, p in lines) <= 1.0 + 1e-6
    metric = "chrf" if task == "translate" else "macro_f1"
    args = ["eval", "--compare", workdir, workdir, f"eval.main_metric={metric}"]
    assert main(args + ["eval.bootstrap_samples=50"]) == 0
    with open(f"{workdir}/compare.json") as f:
        cmp = json.load(f)
    assert cmp["metric"] == metric and cmp["p_value"] == 1.0
    # A metric the task does not have is a one-line user error.
    assert main(["eval", "--compare", workdir, workdir, "eval.main_metric=rouge9"]) == 2
    assert "not a metric of task" in capsys.readouterr().err
