"""Fault injection in real processes: SIGTERM, kill -9 (also mid-checkpoint), corrupted
checkpoints, NaN/Inf, full or unwritable disks. Every trial must end at the parameters
of an uninterrupted run; totals are printed at the end of the pytest run."""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from faultlog import record

from jaxllm import guards
from jaxllm.config import load_config
from jaxllm.errors import UserError
from jaxllm.train import train

pytestmark = pytest.mark.slow  # end-to-end runs (still in CI, not in make test-fast)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Four checkpoints (every 3 steps) in a run: enough for every kill point and fallback
# below, and each of the ~30 processes here saves only those four.
STEPS = 12
RUN = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_len=64",
    "data.seq_len=32",
    "train.batch_size=8",
    f"train.steps={STEPS}",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=20",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "optim.warmup_steps=2",
]


def _cmd(workdir, extra=()):
    return [sys.executable, "-m", "jaxllm.cli", "train", "configs/lm_tiny.yaml", *RUN, *extra,
            "--workdir", workdir]  # fmt: skip


def _run(workdir, extra=(), timeout=300):
    proc = subprocess.run(_cmd(workdir, extra), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _params(workdir, step=STEPS):
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )
    return {k: np.asarray(v) for k, v in _flat(restored["params"])}


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"loss"' in line)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run(workdir)
    return _params(workdir)


def _kill_when(proc, workdir, mode, rng):
    """Waits for the moment chosen by `mode`, then SIGKILLs; returns False if it ended first."""
    deadline = time.time() + 240
    while _logged_steps(workdir) < 1:
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.01)
    if mode == "random":
        time.sleep(rng.uniform(0.0, 0.6))
    else:  # mid-write: orbax writes into "<step>.orbax-checkpoint-tmp-*" until it commits
        pattern = os.path.join(workdir, "checkpoints", "*tmp*")
        while not glob.glob(pattern):
            if proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
def test_kill9_trials_resume_to_identical_parameters(reference, tmp_path):
    rng = random.Random(0)
    trials, survived, lost = 0, 0, 0
    for trial in range(10):
        mode = "random" if trial % 2 == 0 else "mid_checkpoint"
        workdir = str(tmp_path / f"trial{trial}")
        for _ in range(3):  # a run that finished before the kill is retried, not counted
            proc = subprocess.Popen(_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            if _kill_when(proc, workdir, mode, rng):
                break
            subprocess.run(["rm", "-rf", workdir], check=True)
        else:
            pytest.fail(f"trial {trial}: could not kill the run before it finished")
        trials += 1
        _run(workdir)  # the same command again resumes from the last complete checkpoint
        ok = _same(_params(workdir), reference)
        survived += ok
        lost += not ok
    record(trials=trials, survived=survived, lost=lost)
    print(f"kill -9: {trials} trials, {survived} resumed bit-identically, {lost} lost")
    assert trials == 10 and lost == 0


@pytest.mark.slow
def test_sigterm_saves_checkpoint_exits_zero_and_resumes(reference, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    while _logged_steps(workdir) < 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] is True and summary["steps"] < STEPS
    assert "preempted: checkpoint of step" in err
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(summary["steps"])))
    _run(workdir)
    assert _same(_params(workdir), reference)
    record(trials=1, survived=1)


def _biggest_file(directory):
    files = [
        p for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p)
    ]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_latest_checkpoint_falls_back_and_keeps_it(reference, tmp_path, damage):
    workdir = str(tmp_path / "run")
    _run(workdir)
    victim = _biggest_file(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.remove(victim)
    proc = _run(workdir)  # resumes from 9, retrains 10..12, saves 12 again
    assert f"checkpoint step {STEPS} is unreadable" in proc.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{STEPS}.corrupt-0"))  # kept
    saved = range(3, STEPS + 1, 3)
    assert all(os.path.isdir(os.path.join(workdir, "checkpoints", str(s))) for s in saved)
    assert _same(_params(workdir), reference)
    record(trials=1, survived=1)


def _tiny_cfg(*extra):
    return load_config("configs/lm_tiny.yaml", [*RUN, *extra])


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    cfg = _tiny_cfg(
        "optim.lr=1e35",  # the first update blows the weights up: every later loss is NaN/Inf
        "optim.clip_norm=0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.max_nonfinite_steps=3",
        "train.checkpoint_every=1",
        "train.async_checkpoint=false",
        "mesh.data=1",
    )
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row") as err:
        train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert "\n" not in str(err.value)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    # Step 1 was finite; steps 2-4 were skipped, leaving the parameters of step 1.
    assert records[0]["nonfinite_steps"] == 0 and records[-1]["nonfinite_steps"] == 3
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    first, last = _params(str(tmp_path), saved[0]), _params(str(tmp_path), saved[-1])
    assert _same(first, last) and all(np.isfinite(v).all() for v in last.values())
    record(trials=1, survived=1)


def test_unwritable_workdir_and_full_disk_preflight(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run(_cmd(str(blocker / "run")), cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not writable" in proc.stderr.strip().splitlines()[-1]

    class Tiny:
        free = 1024

    monkeypatch.setattr(guards.shutil, "disk_usage", lambda path: Tiny())
    with pytest.raises(UserError, match="MiB free but 20 checkpoints plus one"):
        train(_tiny_cfg("mesh.data=1"), str(tmp_path / "full"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "full" / "metrics.jsonl")  # stopped before training
    record(trials=2, survived=2)


def _mount_tmpfs(path, size_bytes):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path],
                          capture_output=True)  # fmt: skip
    return proc.returncode == 0


def test_disk_full_at_save_time_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = _tiny_cfg("mesh.data=1", "train.preflight_disk=false", "train.async_checkpoint=false",
                    "train.steps=6")  # fmt: skip

    workdir = str(tmp_path / "disk")
    one_checkpoint = None
    if _mount_tmpfs(workdir, 64 * 2**20):
        # A real full disk: first learn the size of one checkpoint, then remount so that
        # exactly one fits beside the logs.
        train(_tiny_cfg("mesh.data=1", "train.steps=3", "train.async_checkpoint=false"),
              str(tmp_path / "probe"), devices=jax.devices()[:1])  # fmt: skip
        one_checkpoint = sum(
            os.path.getsize(p)
            for p in glob.glob(str(tmp_path / "probe" / "checkpoints" / "3" / "**"), recursive=True)
            if os.path.isfile(p)
        )
        subprocess.run(["umount", workdir], check=True)
        assert _mount_tmpfs(workdir, int(one_checkpoint * 1.5) + 2**20)
    else:
        # No mount permission: make the second save fail as a full disk would.
        real_save = ocp.CheckpointManager.save
        calls = {"n": 0}

        def failing_save(self, step, *a, **k):
            calls["n"] += 1
            if calls["n"] >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(self, step, *a, **k)

        monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    try:
        with pytest.raises(UserError) as err:
            train(cfg, workdir, devices=jax.devices()[:1])
        message = str(err.value)
        assert "step 3 is intact" in message and "\n" not in message, message
        assert _params(workdir, 3)  # the checkpoint before the failure still restores
    finally:
        if one_checkpoint is not None:
            subprocess.run(["umount", "-l", workdir], check=False)
    assert not os.path.ismount(workdir)  # nothing left mounted for later tests or runs
    record(trials=1, survived=1)
