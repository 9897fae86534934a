"""The shipped CPU task configs train end to end and beat their trivial baselines.

Each test runs a config as shipped, only shorter (fewer steps, and for classification
a shorter row), on one device, then checks the final eval against the baseline the
eval itself reports: the majority class (classify), copying the English source
(translate), a unigram language model (dialogue). Full-length figures are in the
README; these runs keep the suite inside its CI budget.
"""

import jax
import pytest

from jaxllm.config import load_config
from jaxllm.train import train

pytestmark = pytest.mark.slow
QUIET = [
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "mesh.data=1",
]


def _run(config, overrides, workdir):
    cfg = load_config(config, QUIET + overrides)
    summary = train(cfg, str(workdir), devices=jax.devices()[:1])
    return {k: v for k, v in summary.items() if k.startswith("eval_") and k != "eval_details"}


def test_topic_classifier_beats_the_majority_class(tmp_path):
    got = _run("configs/cls_chatter_topic.yaml", ["train.steps=90", "data.seq_len=64"], tmp_path)
    print(got)
    # Measured (AMD EPYC, 2 cores): accuracy 0.711 and macro-F1 0.273 at 90 steps (0.811
    # and 0.393 at 150).
    # Majority class: 33 of the 90 validation conversations (accuracy 0.367, macro-F1 0.026).
    # The class-weight comparison (balanced weights raise macro-F1) is a README figure from
    # full-length runs: at this length the gap is too small to assert without flaking.
    assert got["eval_majority_accuracy"] == pytest.approx(33 / 90)
    assert got["eval_accuracy"] > got["eval_majority_accuracy"] + 0.2
    assert got["eval_macro_f1"] > 5 * got["eval_majority_macro_f1"]


def test_translation_beats_copying_the_source(tmp_path):
    got = _run("configs/mt_numbers_de.yaml", ["train.steps=120"], tmp_path)
    print(got)
    # Measured (AMD EPYC, 2 cores): BLEU 25.8, chrF 54.2 at 120 steps (31.5, 61.4 at 200);
    # copying the source scores BLEU 0.45, chrF 13.7.
    assert got["eval_examples"] == 556  # the whole validation split was decoded
    assert got["eval_bleu"] > got["eval_baseline_bleu"] + 20
    assert got["eval_chrf"] > got["eval_baseline_chrf"] + 20


def test_dialogue_beats_the_unigram_perplexity(tmp_path):
    got = _run("configs/dialogue_chatter.yaml", ["train.steps=90"], tmp_path)
    print(got)
    # Measured (AMD EPYC, 2 cores): perplexity 161 and ROUGE-L 0.047 at 90 steps.
    # A context-free unigram model of the training responses scores ~497 on validation.
    assert got["eval_perplexity"] < got["eval_baseline_perplexity"] / 2
    # Decoded replies overlap their references (ROUGE-L is reported next to the echo
    # baseline; at this size it does not beat echoing the question back, see README).
    assert got["eval_examples"] == 115 and got["eval_rouge_l"] > 0.03
