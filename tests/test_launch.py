"""launch/: shellcheck, exact --dry-run commands, one-line errors, failure handling.

Cloud TPU and SLURM cannot be reached from CI, so `gcloud` and `srun` are replaced by
stubs on PATH that record their arguments: the real (non-dry) code paths run, and
what they executed is compared with what --dry-run prints.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU = os.path.join(LAUNCH, "tpu_vm.sh")
SLURM = os.path.join(LAUNCH, "slurm.sbatch")
LOCAL = os.path.join(LAUNCH, "local_multiprocess.sh")
TPU_OK = [TPU, "--name", "t", "--zone", "z", "--accelerator-type", "v4-8"]
TINY = "configs/lm_tiny.yaml"
SCRIPTS = sorted(
    os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch"))
)


def _run(argv: list[str], env: dict | None = None, timeout: int = 120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["bash", *argv], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def _lines(argv: list[str], env: dict | None = None) -> list[str]:
    done = _run(argv, env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def test_shellcheck_passes_on_every_launch_script():
    assert {os.path.basename(s) for s in SCRIPTS} >= {
        "tpu_vm.sh", "slurm.sbatch", "local_multiprocess.sh"
    }  # fmt: skip
    shellcheck = os.path.join(sys.prefix, "bin", "shellcheck")
    done = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", *SCRIPTS], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_help_exits_zero_with_usage(script):
    done = _run([script, "--help"])
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr
    assert "--dry-run" in done.stdout


TARBALL = (
    f"tar -czf /tmp/jaxllm-tpu1.tar.gz -C {REPO} --exclude=./.git --exclude=./.venv "
    "--exclude=./.cache --exclude=./runs --exclude=./.hypothesis --exclude=./.pytest_cache "
    "--exclude=./.ruff_cache --exclude=__pycache__ '--exclude=*.egg-info' ."
)
INSTALL = (
    "'rm -rf jaxllm && mkdir jaxllm && tar -xzf jaxllm.tar.gz -C jaxllm && "
    "python3 -m pip install -q '\\''./jaxllm[tpu]'\\'''"
)


def test_tpu_vm_queued_resource_dry_run():
    lines = _lines(
        [TPU, "--dry-run", "--name", "tpu1", "--zone", "us-central2-b", "--accelerator-type",
         "v5litepod-16", "--queued", "--spot", "configs/gpt2_124m.yaml", "train.steps=100",
         "optim.lr=3e-4", "--workdir", "/mnt/shared/runs/gpt2"]
    )  # fmt: skip
    where = "--zone=us-central2-b"
    assert lines == [
        "gcloud compute tpus queued-resources create tpu1 --node-id=tpu1 "
        f"{where} --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe tpu1 {where} '--format=value(state.state)'",
        TARBALL,
        f"gcloud compute tpus tpu-vm scp /tmp/jaxllm-tpu1.tar.gz tpu1:jaxllm.tar.gz --worker=all "
        f"{where}",
        f"gcloud compute tpus tpu-vm ssh tpu1 --worker=all {where} --command {INSTALL}",
        f"gcloud compute tpus tpu-vm ssh tpu1 --worker=all {where} --command 'cd jaxllm && "
        "python3 -m jaxllm.cli train configs/gpt2_124m.yaml train.steps=100 optim.lr=3e-4 "
        "distributed.num_processes=-1 --workdir /mnt/shared/runs/gpt2'",
        f"gcloud compute tpus queued-resources delete tpu1 {where} --force --quiet",
    ]


def test_tpu_vm_create_dry_run_quotes_overrides_and_keeps_on_request():
    lines = _lines(
        [TPU, "--name", "tpu1", "--zone", "europe-west4-a", "--accelerator-type", "v4-8",
         "--project", "my-proj", "--keep", "--dry-run", "configs/lm_tiny.yaml",
         "data.source=my docs's.txt", "--workdir", "runs/tiny"]
    )  # fmt: skip
    where = "--zone=europe-west4-a --project=my-proj"
    assert len(lines) == 5  # no delete with --keep, no state polling without --queued
    assert lines[0] == (
        f"gcloud compute tpus tpu-vm create tpu1 {where} --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base"
    )
    assert lines[2] == (
        f"gcloud compute tpus tpu-vm scp /tmp/jaxllm-tpu1.tar.gz tpu1:jaxllm.tar.gz "
        f"--worker=all {where}"
    )
    # The remote command survives two rounds of shell parsing (here, then on the worker).
    words = shlex.split(lines[4])
    assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--worker=all",
                         "--zone=europe-west4-a", "--project=my-proj"]  # fmt: skip
    assert words[9] == "--command"
    assert shlex.split(words[10]) == [
        "cd", "jaxllm", "&&", "python3", "-m", "jaxllm.cli", "train", "configs/lm_tiny.yaml",
        "data.source=my docs's.txt", "distributed.num_processes=-1", "--workdir", "runs/tiny",
    ]  # fmt: skip


def _stub(tmp_path, name: str, body: str) -> dict:
    """A fake `name` on PATH that appends its arguments (one JSON list a line) to a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    stub = bin_dir / name
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" "
        f">> {log}\n{body}\n"
    )
    stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}


def _calls(log: str) -> list[list[str]]:
    import json

    with open(log, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tpu_vm_deletes_the_tpu_when_training_fails(tmp_path):
    # The stub fails the training command only: the script must stop and still delete.
    env = _stub(tmp_path, "gcloud", 'case "$*" in *jaxllm.cli*) exit 7 ;; esac')
    argv = [TPU, "--name", "tpu1", "--zone", "z1", "--accelerator-type", "v4-8",
            "configs/lm_tiny.yaml", "train.steps=5", "--workdir", "runs/x"]  # fmt: skip
    done = _run(argv, env)
    assert done.returncode == 7
    assert "deleting TPU 'tpu1'" in done.stderr
    ran = [["gcloud", *c] for c in _calls(env["LOG"])]
    dry = [shlex.split(line) for line in _lines([*argv, "--dry-run"])]
    # create, scp, install, run, delete: exactly what --dry-run printed.
    assert ran == [words for words in dry if words[0] == "gcloud"]
    assert not os.path.exists("/tmp/jaxllm-tpu1.tar.gz")


def test_tpu_vm_queued_resource_runs_what_dry_run_prints(tmp_path):
    # The stub reports the queued resource ACTIVE at once and every command succeeds.
    env = _stub(tmp_path, "gcloud", 'case "$*" in *describe*) echo ACTIVE ;; esac')
    argv = [*TPU_OK, "--queued", TINY, "--workdir", "runs/x"]
    done = _run(argv, env)
    assert done.returncode == 0, done.stderr
    ran = [["gcloud", *c] for c in _calls(env["LOG"])]
    dry = [shlex.split(line) for line in _lines([*argv, "--dry-run"])]
    assert ran == [words for words in dry if words[0] == "gcloud"]
    assert ran[-1][:4] == ["gcloud", "compute", "tpus", "queued-resources"]
    assert "delete" in ran[-1]


def test_bad_process_count_is_a_user_error():
    from jaxllm.config import DistributedConfig
    from jaxllm.errors import UserError
    from jaxllm.sharding import init_distributed

    with pytest.raises(UserError, match="num_processes=0"):
        init_distributed(DistributedConfig(num_processes=0))


def test_slurm_dry_run_and_the_job_runs_the_same_command(tmp_path):
    argv = [SLURM, "--python", "/opt/venv/bin/python", "configs/llama_1b.yaml",
            "train.steps=20", "--workdir", "/shared/runs/llama"]  # fmt: skip
    expected = (
        "srun --kill-on-bad-exit=1 /opt/venv/bin/python -m jaxllm.cli train "
        "configs/llama_1b.yaml train.steps=20 distributed.num_processes=-1 "
        "--workdir /shared/runs/llama"
    )
    assert _lines([*argv, "--dry-run"], _unset_slurm()) == [expected]
    env = _stub(tmp_path, "srun", "exit 0") | {"SLURM_JOB_ID": "42"}
    assert _run(argv, env).returncode == 0
    assert [["srun", *c] for c in _calls(env["LOG"])] == [shlex.split(expected)]


def _unset_slurm() -> dict:
    return {k: "" for k in os.environ if k.startswith("SLURM_")}


def test_local_multiprocess_dry_run():
    lines = _lines(
        [LOCAL, "--dry-run", "--devices-per-process", "4", "--port", "12345", "--jaxllm",
         "/venv/bin/jaxllm", "2", "configs/lm_tiny.yaml", "train.steps=3", "--workdir", "runs/mp"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )  # fmt: skip
    assert lines == [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
        "/venv/bin/jaxllm train configs/lm_tiny.yaml train.steps=3 "
        f"distributed.coordinator=127.0.0.1:12345 distributed.num_processes=2 "
        f"distributed.process_id={i} --workdir runs/mp"
        for i in range(2)
    ]


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
    # Rank 1 fails at once; rank 0 would run for minutes: the launcher must kill it
    # and exit with rank 1's status.
    fake = tmp_path / "fake_jaxllm"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do case "$a" in distributed.process_id=*) rank="${a#*=}" ;; esac; done\n'
        f'echo $$ > {tmp_path}/pid_$rank\n'
        'echo "hello from $rank"\n'
        '[[ "$rank" == 1 ]] && exit 3\n'
        "exec sleep 300\n"
    )  # fmt: skip
    fake.chmod(0o755)
    done = _run(
        [LOCAL, "--jaxllm", str(fake), "2", "configs/lm_tiny.yaml", "--workdir", str(tmp_path)]
    )
    assert done.returncode == 3
    assert "process 1 exited with status 3" in done.stderr
    assert sorted(done.stdout.splitlines()) == ["[rank 0] hello from 0", "[rank 1] hello from 1"]
    pid0 = int((tmp_path / "pid_0").read_text())
    assert not os.path.exists(f"/proc/{pid0}")


BAD_ARGS = [
    ([TPU, "--zone", "z", "--accelerator-type", "v4-8", "c.yaml", "--workdir", "w"], "--name"),
    ([TPU, "--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v4-8", "c.yaml"], "--name"),
    ([*TPU_OK, TINY, "--workdir", "gs://b/run"], "gs://"),
    ([*TPU_OK, "configs/nope.yaml", "--workdir", "w"], "not found"),
    ([*TPU_OK, TINY, "steps", "--workdir", "w"], "key=value"),
    ([*TPU_OK, TINY, "distributed.num_processes=4", "--workdir", "w"], "distributed"),
    ([TPU, "--bogus"], "unknown option"),
    ([TPU, "--name"], "needs a value"),
    ([SLURM, "--dry-run", TINY], "--workdir"),
    ([SLURM, "--dry-run", TINY, "distributed.num_processes=2", "--workdir", "w"], "distributed"),
    ([SLURM, TINY, "--workdir", "w"], "not inside a SLURM job"),
    ([LOCAL, "two", TINY, "--workdir", "w"], "positive integer"),
    ([LOCAL, "--devices-per-process", "0", "2", TINY, "--workdir", "w"], "positive"),
    ([LOCAL, "2", TINY], "--workdir"),
    ([LOCAL, "2"], "expected N and CONFIG"),
    ([LOCAL, "2", TINY, "distributed.process_id=1", "--workdir", "w"], "distributed"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_give_one_line_and_exit_2(argv, needle):
    done = _run(argv, _unset_slurm())
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and needle in lines[0], done.stderr


def test_slurm_variables_start_jaxllm_multiprocess(tmp_path):
    """What slurm.sbatch relies on: with distributed.num_processes=-1,
    `sharding.init_distributed` lets JAX read SLURM's variables (here faked, 2 tasks)."""
    code = (
        "import jax, numpy as np\n"
        "from jax.experimental import multihost_utils\n"
        "from jaxllm import sharding\n"
        "from jaxllm.config import DistributedConfig\n"
        "sharding.init_distributed(DistributedConfig(num_processes=-1))\n"
        "x = multihost_utils.process_allgather(np.array([jax.process_index() + 1.0]))\n"
        "print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(), x.sum())\n"
    )
    job = str(10_000 + os.getpid() % 50_000)  # SLURM's port is derived from the job id
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            SLURM_JOB_ID=job,
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=180) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-2000:]
        # Gloo writes its own lines to stdout too.
        result = [line.split()[1:] for line in out.splitlines() if line.startswith("RESULT ")]
        assert result == [[str(rank), "2", "4", "3.0"]], out


def test_readme_launch_commands_dry_run():
    """The README's launch examples are valid invocations (run with --dry-run)."""
    import re

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["sbatch"]:  # sbatch's own options come before the script
            words = words[next(i for i, w in enumerate(words) if w.startswith("launch/")) :]
        if words and words[0].startswith("launch/"):
            commands.append(words)
    assert {c[0] for c in commands} == {
        "launch/local_multiprocess.sh", "launch/tpu_vm.sh", "launch/slurm.sbatch"
    }  # fmt: skip
    for words in commands:
        done = _run([os.path.join(REPO, words[0]), "--dry-run", *words[1:]], _unset_slurm())
        assert done.returncode == 0, f"{words}: {done.stderr}"
