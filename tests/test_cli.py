"""The CLI in subprocesses: one-line user errors, kill -9 and resume, eval and generate."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_len=64",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.progress_bar=false",
    "optim.warmup_steps=2",
]


def jaxllm(*args, timeout=300, check=False):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"jaxllm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


BAD_CONFIGS = {
    "unknown_key": (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean lr"),
    "unknown_section": (["modle.d_model=8"], "unknown config key 'modle'; did you mean model"),
    "wrong_type": (["train.steps=many"], "config key 'train.steps' must be int, got 'many'"),
    "bad_choice": (["precision=fp8"], "allowed values: fp32, bf16, fp16"),
    "bad_value": (["model.n_heads=5"], "not divisible by model.n_heads=5"),
    "not_key_value": (["train.steps"], "is not key=value"),
    "mesh_does_not_divide": (["mesh.fsdp=3"], "does not divide 8 devices"),
    "mesh_wrong_count": (["mesh.data=2", "mesh.fsdp=2"], "needs 4 devices but 8 are available"),
    "mesh_too_big": (["mesh.data=4", "mesh.fsdp=4"], "needs 16 devices but 8 are available"),
    "batch_not_divisible": (["train.batch_size=12"], "not divisible by the 8 batch shards"),
}


def jaxllm_batch(*argvs, timeout=600):
    """Runs each argument list through the CLI's main in one process (tests/cli_batch.py)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "cli_batch.py")],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads(proc.stdout.splitlines()[-1])]


@pytest.fixture(scope="module")
def bad_config_results(tmp_path_factory):
    """Every BAD_CONFIGS command line, run in one process (one JAX start-up, not ten)."""
    root = tmp_path_factory.mktemp("bad_configs")
    argvs = [
        ["train", "configs/lm_tiny.yaml", *overrides, "--workdir", str(root / case)]
        for case, (overrides, _) in BAD_CONFIGS.items()
    ]
    return dict(zip(BAD_CONFIGS, jaxllm_batch(*argvs), strict=True))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_gives_one_line_error(case, bad_config_results):
    _assert_one_line_error(bad_config_results[case], BAD_CONFIGS[case][1])


def _assert_one_line_error(proc, expected):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxllm: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert expected in errors[0], errors[0]


def test_file_errors_are_one_line(tmp_path):
    # One case in a process of its own, as a user runs it (exit status, stderr, no
    # traceback from the interpreter); the others share one process.
    _assert_one_line_error(
        jaxllm("train", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path / "w")),
        "not found",
    )
    bad_yaml = _write(tmp_path / "bad.yaml", "model: [unclosed\n")
    not_mapping = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    w = str(tmp_path / "w")
    cases = {
        "is not valid YAML": ["train", bad_yaml, "--workdir", w],
        "must hold a mapping": ["train", not_mapping, "--workdir", w],
        "no config.yaml": ["eval", "--workdir", str(tmp_path / "none")],
        "is not UTF-8": ["train", "configs/lm_tiny.yaml", f"data.source={latin1}", "--workdir", w],
    }
    for expected, proc in zip(cases, jaxllm_batch(*cases.values()), strict=True):
        _assert_one_line_error(proc, expected)


def _final_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    restored = ocp.PyTreeCheckpointer().restore(path)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(restored["params"])}


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, tree


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_kill_and_rerun_resumes_bitwise_then_eval_and_generate(tmp_path):
    steps = ["train.steps=12", "train.checkpoint_every=4"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    jaxllm("train", "configs/lm_tiny.yaml", *TINY, *steps, "--workdir", ref, check=True)

    cmd = [
        sys.executable,
        "-m",
        "jaxllm.cli",
        "train",
        "configs/lm_tiny.yaml",
        *TINY,
        *steps,
        "--workdir",
        run,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Orbax renames a checkpoint into place only once it is complete.
    while not os.path.isdir(os.path.join(run, "checkpoints", "4")) and time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert 4 <= killed_at < 12, killed_at

    jaxllm("train", "configs/lm_tiny.yaml", *TINY, *steps, "--workdir", run, check=True)
    want, got = _final_params(ref, 12), _final_params(run, 12)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # bitwise
    # Every logged loss after the resume equals the uninterrupted run's, step by step.
    ref_losses, run_losses = _losses(ref), _losses(run)
    assert all(run_losses[s] == ref_losses[s] for s in range(1, 13))

    proc = jaxllm("eval", "--workdir", ref, check=True)
    with open(os.path.join(ref, "eval.json")) as f:
        result = json.load(f)
    assert result["step"] == 12 and 1.0 < result["perplexity"] < 4096
    assert "perplexity" in proc.stdout

    proc = jaxllm(
        "generate", "--workdir", ref, "--prompt", "The list", "max_new_tokens=8", check=True
    )
    assert proc.stdout.startswith("The list") and len(proc.stdout) > len("The list\n")
    proc = jaxllm(
        "generate",
        "--workdir",
        ref,
        "--prompt",
        "The list",
        "strategy=sample",
        "top_k=5",
        "top_p=0.9",
        "temperature=0.7",
        "max_new_tokens=8",
        check=True,
    )
    assert proc.stdout.startswith("The list")
    _assert_one_line_error(
        jaxllm("generate", "--workdir", ref, "--prompt", "x", "beams=3"),
        "unknown generate option 'beams'",
    )
