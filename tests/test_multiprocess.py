"""Multi-process training on one machine (launch/local_multiprocess.sh) gives one run's numbers.

Two `jaxllm train` processes with 4 CPU devices each (JAX multi-controller over gloo)
train the same model as one process with 8 devices: same losses, same parameters.
A checkpoint written by the 2-process run on an fsdp=8 mesh is resumed by a single
process on a data=2 x fsdp=4 mesh and ends where an uninterrupted run ends.

Tolerance: the losses and parameters agree to fp32 reduction order, not bit for bit.
Both runs compile the same SPMD program over the same 8-device mesh, but gloo's
all-reduce adds the two processes' partial sums in another order than XLA's
in-process CPU all-reduce (measured: max |param difference| ~1e-6 after 4 AdamW
steps), and the resumed run uses a different mesh, hence different partial sums.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import Checkpointer
from jaxllm.config import load_config
from jaxllm.train import host_params, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
JAXLLM = os.path.join(sys.prefix, "bin", "jaxllm")
CONFIG = os.path.join(REPO, "configs", "lm_tiny.yaml")
STEPS = 4
# A tiny model and batch: the point is the plumbing, not the model.
OVERRIDES = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_len=32",
    "data.seq_len=32",
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.progress_bar=false",
    "train.tensorboard=false",
]
RTOL, ATOL = 1e-5, 1e-5


def _metrics(workdir: str) -> dict[int, dict]:
    """Train records by step, and the final eval record under key -1."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[-1 if "eval_loss" in rec and "loss" not in rec else rec["step"]] = rec
    return out


def _launch_two_processes(workdir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own device count
    return subprocess.run(
        ["bash", LAUNCHER, "--devices-per-process", "4", "--jaxllm", JAXLLM, "2", CONFIG,
         *OVERRIDES, "mesh.data=1", "mesh.fsdp=8", "--workdir", workdir],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _assert_trees_close(a, b) -> None:
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=str(path))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
    multi = str(tmp_path / "two_procs")
    done = _launch_two_processes(multi)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Every line carries its rank; both processes ran to the end.
    lines = done.stdout.splitlines()
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in lines), lines[:5]
    for rank in (0, 1):
        summaries = [x for x in lines if x.startswith(f"[rank {rank}] {{")]
        assert json.loads(summaries[-1].split(" ", 2)[2])["steps"] == STEPS

    # The reference: one process over the same 8-device mesh (this pytest process).
    single = str(tmp_path / "one_proc")
    cfg = load_config(CONFIG, [*OVERRIDES, "mesh.data=1", "mesh.fsdp=8"])
    ref = train(cfg, single)
    ref_metrics, multi_metrics = _metrics(single), _metrics(multi)
    assert sorted(multi_metrics) == sorted(ref_metrics) == [-1, *range(1, STEPS + 1)]
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "accuracy"):
            assert multi_metrics[step][key] == pytest.approx(ref_metrics[step][key], rel=RTOL)
    assert multi_metrics[-1]["eval_loss"] == pytest.approx(ref_metrics[-1]["eval_loss"], rel=RTOL)
    # The saved config is the experiment, without this launch's coordinator and rank.
    saved = load_config(os.path.join(multi, "config.yaml"), [])
    assert (saved.distributed.coordinator, saved.distributed.num_processes) == ("", 1)

    # Both processes' shards went into one checkpoint: restored here (1 process), it
    # holds the same parameters as the single-process run, and the same data position.
    abstract = ref["session"].steps.abstract_state
    state, data_state, step = Checkpointer(os.path.join(multi, "checkpoints")).restore(abstract)
    ref_params = host_params(ref["state"])
    assert step == STEPS
    _assert_trees_close(host_params(state), ref_params)
    assert data_state == Checkpointer(os.path.join(single, "checkpoints")).restore(abstract)[1]
    # The comparison can fail: one step apart the parameters differ far beyond tolerance.
    early, _, _ = Checkpointer(os.path.join(multi, "checkpoints")).restore(abstract, 2)
    with pytest.raises(AssertionError):
        _assert_trees_close(host_params(early), ref_params)

    # Resume the 2-process fsdp=8 checkpoint of step 2 with 1 process on data=2 x fsdp=4.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(multi, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    cfg = load_config(CONFIG, [*OVERRIDES, "mesh.data=2", "mesh.fsdp=4"])
    out = train(cfg, resumed)
    assert out["start_step"] == 2
    _assert_trees_close(host_params(out["state"]), ref_params)
    # metrics.jsonl now holds the 2-process steps 1..4 and the resumed steps 3..4 after them.
    with open(os.path.join(resumed, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 3, 4]
    for rec in losses[-2:]:
        assert rec["loss"] == pytest.approx(ref_metrics[rec["step"]]["loss"], rel=RTOL)
