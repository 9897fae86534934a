"""One DP + FGM-adversarial classify run, then `jaxllm eval` / `generate` with input filters.

A single tiny training run on the embedded chatter topics covers the pieces together:
the DP-SGD step with an adversarial loss inside its per-example gradients, epsilon in
the metrics, the summary and eval.json, eval under character noise, eval examples and
prompts rejected by the input filter.
"""

import json
import os
import re

import jax
import pytest

from jaxllm import cli, data, privacy
from jaxllm.config import load_config
from jaxllm.train import train

pytestmark = pytest.mark.slow  # end-to-end runs (still in CI, not in make test-fast)

TARGET_EPSILON = 4.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dp_adv"))
    cfg = load_config(
        "configs/cls_chatter_topic.yaml",
        [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=3",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=0",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "mesh.data=1",
            "privacy.dp=true",
            f"privacy.target_epsilon={TARGET_EPSILON}",
            "adversarial.method=fgm",
            "adversarial.epsilon=0.5",
        ],
    )
    summary = train(cfg, path, devices=jax.devices()[:1])
    with open(os.path.join(path, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return path, summary, metrics


def test_dp_epsilon_and_adversarial_loss_are_logged(run):
    path, summary, metrics = run
    steps = [r for r in metrics if "loss" in r]
    eps = [r["dp_epsilon"] for r in steps]
    assert len(eps) == 3 and 0 < eps[0] < eps[1] < eps[2] <= TARGET_EPSILON
    # The noise was derived so that the whole run spends the target (bisection, 1e-4).
    assert summary["dp_epsilon"] == pytest.approx(TARGET_EPSILON, rel=1e-3)
    assert metrics[-1]["dp_epsilon"] == summary["dp_epsilon"]  # the final report line
    plan = privacy.load_plan(path)
    assert plan.examples == 718 and plan.sampling_rate == pytest.approx(8 / 718)
    assert plan.noise_multiplier == pytest.approx(summary["dp_noise_multiplier"])
    assert privacy.epsilon(plan.sampling_rate, plan.noise_multiplier, 3, 1e-5) == eps[-1]
    for r in steps:
        assert r["adv_loss"] > r["loss"] > 0  # the attack raised the loss of every step
        assert 0.0 <= r["dp_clipped_fraction"] <= 1.0


def test_eval_reports_epsilon_rejections_and_noisy_accuracy(run, capsys):
    path, summary, _ = run
    cfg = load_config(os.path.join(path, "config.yaml"))
    records = data.load_records(cfg.data, "validation", "classify")
    texts = [records[i]["text"] for i in range(len(records))]
    too_long = {i for i, t in enumerate(texts) if len(t) > 150}
    assert 0 < len(too_long) < len(texts)
    overrides = ["input_filter.max_chars=150", "eval.char_noise=0.1"]
    assert cli.main(["eval", "--workdir", path, *overrides]) == 0
    with open(os.path.join(path, "eval.json")) as f:
        result = json.load(f)
    assert result["dp_epsilon"] == pytest.approx(summary["dp_epsilon"])
    assert result["rejected_inputs"] == result["rejected_max_chars"] == len(too_long)
    assert {r["index"] for r in result["details"]["rejected_inputs"]} == too_long
    assert result["examples"] == len(texts) - len(too_long)
    assert 0.0 <= result["noisy_accuracy"] <= 1.0 and result["noisy_loss"] > 0
    assert result["noisy_loss"] != result["loss"]  # the inputs really changed
    table = capsys.readouterr().out
    assert re.search(rf"^rejected_max_chars +{len(too_long)}$", table, re.M)
    assert re.search(r"^dp_delta +1e-05$", table, re.M)


def test_generate_refuses_a_rejected_prompt_with_one_line(run, capsys):
    args = ["generate", "--workdir", run[0], "--prompt"]
    assert cli.main([*args, "tell me a joke", "input_filter.blocklist_words=[joke]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxllm: error: prompt rejected by input_filter.blocklist_words: contains 'joke'"
    assert cli.main([*args, "hi\x1b[2J", "input_filter.reject_control_chars=true"]) == 2
    assert "input_filter.reject_control_chars: '\\x1b' (U+001B) at 2" in capsys.readouterr().err
    assert cli.main([*args, "tell me a story", "input_filter.blocklist_words=[joke]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all("\t" in line for line in lines)  # top-5 classes
