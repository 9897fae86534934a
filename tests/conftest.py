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

import pytest  # noqa: E402
from schedule import (  # noqa: E402
    DurationRecorder,
    UnitScheduling,
    load_durations,
    order_items,
    write_units,
)


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test's seconds to tests/durations.json (the order of later runs)",
    )


def pytest_collection_modifyitems(config, items):
    """Longest tests first, shared-fixture tests in one unit (see tests/schedule.py)."""
    units = order_items(items, load_durations())
    if hasattr(config, "workerinput") and os.environ.get("JAXLLM_TEST_UNITS"):
        write_units(os.environ["JAXLLM_TEST_UNITS"], units)


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: this suite's units, longest first (tests/schedule.py)."""
    if config.getoption("dist") == "loadgroup":
        config.option.loadscopereorder = False  # keep the longest-first order
        return UnitScheduling(config, log, os.environ["JAXLLM_TEST_UNITS"])
    return None


def pytest_configure(config):
    """The controlling process names the file the fault counts go to (workers inherit it)."""
    if config.getoption("--store-durations"):
        config.pluginmanager.register(DurationRecorder(), "jaxllm-durations")
    if not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="jaxllm-faultlog-", suffix=".jsonl")
        os.close(fd)
        os.environ["JAXLLM_FAULTLOG"] = path
        # Where the xdist workers tell the scheduler which tests form one unit.
        fd, path = tempfile.mkstemp(prefix="jaxllm-test-units-", suffix=".json")
        os.close(fd)
        os.environ["JAXLLM_TEST_UNITS"] = path


def pytest_terminal_summary(terminalreporter):
    """Prints the fault-injection totals (tests/test_faults.py) when any ran."""
    from faultlog import totals

    counts = totals()
    if any(counts.values()):
        terminalreporter.write_sep("=", "fault injection")
        terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in counts.items()))
