"""Test setup: CPU backend with 8 fake devices, set before jax is imported anywhere."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Not setdefault: the Makefile exports JAX_PLATFORMS empty, and with libtpu installed (for
# `jaxllm plan`) an empty value makes every process probe for a TPU and print errors.
if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
# Prepared corpora and trained tokenizers are cached once per checkout, not per test.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAXLLM_DATA_DIR", os.path.join(REPO, ".cache", "data"))
sys.path.insert(0, os.path.join(REPO, "tests"))
# One persistent XLA compilation cache for the whole run, subprocesses included: many tests
# start `jaxllm train` on the same tiny configs (kill -9 trials alone start ~40), and each
# start would otherwise compile the same train step again. Cached programs are the same
# compiled code, so bitwise-resume assertions are unaffected.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_configure(config):
    """The controlling process names the file the fault counts go to (workers inherit it)."""
    if not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="jaxllm-faultlog-", suffix=".jsonl")
        os.close(fd)
        os.environ["JAXLLM_FAULTLOG"] = path


def pytest_terminal_summary(terminalreporter):
    """Prints the fault-injection totals (tests/test_faults.py) when any ran."""
    from faultlog import totals

    counts = totals()
    if any(counts.values()):
        terminalreporter.write_sep("=", "fault injection")
        terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in counts.items()))
